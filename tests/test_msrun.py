"""Data parallel on CPU: msrun with 2 workers through the run_mindformer.py path (slow)."""
import json
import math
import os
import re
import socket
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, RUN_MINDFORMER

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from mindformers_lora_ext.tiny_data import write_tiny_dataset
    path = tmp_path_factory.mktemp("data") / "train.mindrecord"
    return write_tiny_dataset(str(path), num_rows=64, seq_length=32, vocab_size=128)


# dora is left out for CI time: its magnitude vector is all-reduced as any trainable parameter
# is, and its layer runs the same dropout and kernels as lora_ext's under data_parallel.
@pytest.mark.parametrize("name", ["lora_ext", "adalora", "eva"])
def test_two_worker_data_parallel(tmp_path, dataset, name):
    """adalora: the rank allocator on each worker reads the all-reduced gradient taps, so both
    prune the same triplets (else the checksums below would differ). eva: each worker reads its
    own shard in the statistics pass, the statistics are all-reduced, so both start from the same
    adapter (else, again, the checksums would differ)."""
    allocator = [{"type": "AdaLoraRankAllocator"}] if name == "adalora" else []
    allocator += [{"type": "DataDrivenInit", "batches": 4}] if name == "eva" else []
    cfg = {"base_config": [os.path.join(ROOT, "configs", "tiny", f"{name}.yaml")],
           "use_parallel": True,
           "parallel": {"parallel_mode": 0, "gradients_mean": True},
           "parallel_config": {"data_parallel": 2},
           "callbacks": [{"type": "MFLossMonitor"}, *allocator,
                         {"type": "AdapterCheckpoint", "save_steps": 8,
                          "output_dir": str(tmp_path / "adapters")},
                         {"type": "TrainingSummary", "summary_file": str(tmp_path / "summary_{rank}.json")}]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    logs = tmp_path / "msrun_logs"
    cmd = [os.path.join(os.path.dirname(sys.executable), "msrun"), "--worker_num=2", "--local_worker_num=2",
           f"--master_port={_free_port()}", f"--log_dir={logs}", "--join=True",
           RUN_MINDFORMER, "--config", str(tmp_path / "run.yaml"), "--train_dataset_dir", dataset,
           "--output_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900,
                          check=False)
    worker = {r: (logs / f"worker_{r}.log").read_text() for r in (0, 1)}
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:] + worker[0][-3000:] + worker[1][-3000:]
    summaries = [json.loads((tmp_path / f"summary_{r}.json").read_text()) for r in (0, 1)]
    assert [s["rank"] for s in summaries] == [0, 1]
    for summary in summaries:  # 64 rows, batch 2, two shards: 16 steps each
        assert len(summary["losses"]) == 16 and all(math.isfinite(v) for v in summary["losses"])
    assert summaries[0]["losses"] != summaries[1]["losses"]  # each worker saw its own shard ...
    # ... yet the adapters are identical: the gradients really were all-reduced
    assert summaries[0]["trainable_checksums"] == summaries[1]["trainable_checksums"]
    first = summaries[0]["trainable_checksums"]
    assert first and all(v[1] > 0 for v in first.values())
    # only rank 0 writes adapter files
    assert re.search(r"saved adapter .*step_16", worker[0]) and "saved adapter" not in worker[1]
    assert sorted(os.listdir(tmp_path / "adapters")) == ["latest", "step_16", "step_8"]
    if name == "eva":  # both ranks read 4 batches; rank 0 reports for both
        assert re.search(r"DataDrivenInit: eva: 4 batches x 2 rank\(s\)", worker[0])
        saved = json.loads((tmp_path / "adapters" / "step_16" / "adapter_config.json").read_text())
        assert saved["init_lora_weights"] == "eva" and saved["rank_pattern"]
    if name == "adalora":  # ranks did shrink (init_r 8 x 8 cells = 64 triplets at the start)
        saved = json.loads((tmp_path / "adapters" / "step_16" / "adapter_config.json").read_text())
        assert 32 <= sum(sum(mask) for mask in saved["rank_pattern"].values()) < 64
