"""engine/environment.py's CPU record: the model name, torch's CPU kernel level and its intra-op thread count."""
import platform

import torch

import engine.environment as environment
from tests.conftest import one_intra_op_thread


def test_cpu_model_is_read_from_cpuinfo_else_from_platform(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz\n"
                       "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz\n")
    assert environment.cpu_model(cpuinfo) == "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"
    monkeypatch.setattr(platform, "processor", lambda: "aarch64")
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nCPU part\t: 0xd0c\n")  # an Arm /proc/cpuinfo: no model name
    assert environment.cpu_model(cpuinfo) == "aarch64"
    assert environment.cpu_model(tmp_path / "missing") == "aarch64"  # not Linux
    monkeypatch.setattr(platform, "processor", lambda: "")
    assert environment.cpu_model(tmp_path / "missing") is None


def test_environment_json_records_the_cpu_its_kernels_and_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(environment, "pip_freeze", lambda: None)
    with one_intra_op_thread():
        record = environment.record_environment(tmp_path / "environment.json", start_epoch=0)[-1]
    assert record["intra_op_threads"] == 1
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and record["cpu_capability"]
    assert record["cpu_model"] == environment.cpu_model()
    machine = environment.machine(torch.device("cpu"))
    assert machine == {"device": "cpu", "gpu": None, **environment.cpu_details()}
