"""Two CPU processes under `accelerate launch` train the same model as one process."""

import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from itemgen.data.synthetic import make_dataset

ARGS = ["model=sasrec", "sasrec.hidden=32", "sasrec.dropout=0.0", "train.batch_size=64", "train.max_steps=12",
        "train.eval_every=6", "train.warmup_steps=2", "train.lr=0.005", "train.progress=false", "data.max_history=10"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate launcher not on PATH")
def test_two_processes_match_one(tmp_path):
    data = tmp_path / "data"
    make_dataset(n_users=400, n_items=30, noise=0.1, seed=3).save(data)
    common = [*ARGS, f"data.path={data}"]
    one = subprocess.run([sys.executable, "-m", "itemgen.cli", "train", *common, f"train.out={tmp_path / 'one'}"],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(["accelerate", "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                          "-m", "itemgen.cli", "train", *common, f"train.out={tmp_path / 'two'}"],
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    # the weights the run started from (train() seeds, then builds the model)
    from accelerate.utils import set_seed

    from itemgen.core.config import load_config
    from itemgen.models.registry import build_model

    cfg = load_config(None, common)
    set_seed(cfg.train.seed)
    init = build_model(cfg, make_dataset(n_users=400, n_items=30, noise=0.1, seed=3).items).state_dict()
    for k in a:
        if not a[k].is_floating_point():  # e.g. the item representation's id_known gate: exactly equal
            assert torch.equal(a[k], b[k]) and torch.equal(a[k], init[k]), k
            continue
        moved = (a[k] - init[k]).abs().max().item()
        diff = (a[k] - b[k]).abs().max().item()
        # float summation order differs between 1 and 2 processes; Adam amplifies it a little
        assert diff <= max(0.02 * moved, 1e-6), (k, diff, moved)
    assert max((a[k] - init[k]).abs().max().item() for k in a if a[k].is_floating_point()) > 0.01  # training moved the weights
