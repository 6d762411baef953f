"""``disagg dashboard``: start the Streamlit app on 127.0.0.1."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add ``dashboard`` to the disagg command line."""

    @app.command()
    def dashboard(port: int = typer.Option(8501, help="Port on 127.0.0.1."),
                  open_browser: bool = typer.Option(False, "--open", help="Open a browser tab.")) -> None:
        """Open the planner / simulator dashboard (Streamlit) on http://127.0.0.1:PORT."""
        import subprocess
        import sys
        from pathlib import Path

        from disagg_cli.main import fail

        try:
            import streamlit  # noqa: F401
        except ModuleNotFoundError:
            fail("the dashboard needs streamlit and plotly: pip install -e '.[dashboard]'")
        app_py = Path(__file__).with_name("app.py")
        cmd = [sys.executable, "-m", "streamlit", "run", str(app_py), "--server.address", "127.0.0.1",
               "--server.port", str(port), "--server.headless", str(not open_browser).lower(),
               "--browser.gatherUsageStats", "false"]
        raise typer.Exit(subprocess.call(cmd))
