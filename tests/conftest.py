"""Shared pytest fixtures."""

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A Hugging Face folder with the tiny preset's shapes and random weights (seed 0), created once per session."""
    from engine.model.loader import create_random_model
    from sim.model_spec import PRESETS

    return create_random_model(tmp_path_factory.mktemp("tiny_model"), PRESETS["tiny"], seed=0)
