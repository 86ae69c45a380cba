# Tests never touch the network: the Hugging Face hub is forced offline, and every
# data set or weight file a test needs is made by the test itself, in the real format.
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
