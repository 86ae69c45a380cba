# Tests never touch the network: the Hugging Face hub is forced offline, and every
# data set or weight file a test needs is made by the test itself, in the real format.
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# The tiny world with questions (tests/test_questions.py), the first stage trained on it
# (tests/test_qformer_stage1.py) and the bridges trained on its mix, each built once for the session: four
# modules use them, and a fixture imported into a module is built again for that module. The modules read
# them through their own fixtures (world, stage1, trained); none of them writes into what it is given.
@pytest.fixture(scope="session")
def questions_world(tmp_path_factory):
    from tests.test_questions import make_world
    return make_world(tmp_path_factory.mktemp("questions"))


@pytest.fixture(scope="session")
def questions_stage1(questions_world, tmp_path_factory):
    from tests.test_qformer_stage1 import train_stage1
    return train_stage1(questions_world, tmp_path_factory.mktemp("stage1") / "run")


@pytest.fixture(scope="session")
def questions_trained(questions_world, tmp_path_factory):
    from tests.test_questions import train_every_bridge
    return train_every_bridge(questions_world, tmp_path_factory.mktemp("runs"))
