"""Issue 13: no script destroys an input or a file it did not write; full disks, kills and
concurrent runs end cleanly with one line."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cheatsheet
from common.io.parts import PartStore
from common.quant.cheatsheet_build import PARTS_DIR
from common.errors import run_main
from common.io.outputs import MANIFEST, output_lock
from tests.helpers import ROOT, assert_input_error, run_script


def tree_digest(folder: Path) -> str:
    """One hash over every file's name and bytes below `folder`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def run_in_process(main, argv: list[str], capsys) -> tuple[int, str]:
    """Run a script's main as `python script.py` would; returns (exit status, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, [str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err


def one_error_line(stderr: str) -> str:
    lines = [line.rsplit("\r", 1)[-1] for line in stderr.splitlines()]
    lines = [line for line in lines if line.strip()]
    errors = [line for line in lines if line.startswith("error") or "Traceback" in line]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-2000:]
    return errors[0]


@pytest.fixture
def pair(llama_pair, tmp_path) -> tuple[Path, Path]:
    """A private copy of the Llama pair (tests here may try to damage it)."""
    original, quantized = tmp_path / "original", tmp_path / "quantized"
    shutil.copytree(llama_pair[0], original)
    shutil.copytree(llama_pair[1], quantized)
    return original, quantized


def test_an_output_on_an_input_is_refused_and_the_input_kept(pair, tmp_path, corpus):
    original, quantized = pair
    before = tree_digest(original), tree_digest(quantized)
    data = tmp_path / "text.txt"
    data.write_text("\n\n".join(corpus))
    attempts = [
        (("conv_awq.py", "--model_path", original, "--fakequant_output", original, "--overwrite"),
         ("--fakequant_output", "is the input --model_path")),
        (("conv_awq.py", "--model_path", original, "--scaled_output", tmp_path / "x", "--fakequant_output",
          tmp_path / "x"), ("two outputs at the same place",)),
        (("conv_awq.py", "--model_path", original, "--fakequant_output", original / "fq"),
         ("lies inside the input --model_path",)),
        (("conv_awq.py", "--model_path", original, "--fakequant_output", tmp_path, "--overwrite"),
         ("contains the input --model_path",)),
        (("conv_sqllm.py", "--original_model_path", original, "--quantized_path", tmp_path / "sq",
          "--output_path", original, "--overwrite"), ("no such directory",)),
        (("cheatsheet.py", "--original_model", original, "--quantized_model", quantized, "--save_path", quantized,
          "--overwrite"), ("lies inside the input --quantized_model",)),
        (("thresholds.py", "--model_path", original, "--save_path", original, "--dataset", data),
         ("lies inside the input --model_path",)),
        (("thresholds.py", "--model_path", original, "--save_path", data.with_suffix(".pt"), "--dataset", data,
          "--overwrite"), ()),  # not an input: must work (checked below)
    ]
    for args, fragments in attempts[:-1]:
        assert_input_error(run_script(*args), *fragments)
        assert (tree_digest(original), tree_digest(quantized)) == before, args
    (tmp_path / "sq" / "lut_3").mkdir(parents=True)
    (tmp_path / "sq" / "weights").mkdir()
    assert_input_error(run_script("conv_sqllm.py", "--original_model_path", original, "--quantized_path",
                                  tmp_path / "sq", "--output_path", original, "--overwrite"),
                       "--output_path", "is the input --original_model_path")
    assert_input_error(run_script("conv_sqllm.py", "--original_model_path", original, "--quantized_path",
                                  tmp_path / "sq", "--output_path", tmp_path / "sq" / "out"),
                       "lies inside the input --quantized_path")
    assert (tree_digest(original), tree_digest(quantized)) == before
    ok = run_script(*attempts[-1][0], "--num_examples", 2, "--seq_len", 64, "--quiet")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert not list(original.glob("thresholds*")) and data.with_suffix(".pt").is_file()


def test_overwrite_replaces_only_our_own_files(pair, tmp_path):
    original, _ = pair
    out = tmp_path / "fq"
    common = ["--model_path", original, "--w_bit", 3, "--q_group_size", 32, "--quiet"]
    first = run_script("conv_awq.py", *common, "--fakequant_output", out)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "wrote" in first.stderr and str(out) in first.stderr  # --quiet keeps the final lines
    listed = json.loads((out / MANIFEST).read_text())["files"]
    assert "config.json" in listed and "model.safetensors.index.json" in listed
    (out / "notes.txt").write_text("mine")
    (out / "cheatsheet.pt").write_bytes(b"not ours either")
    again = run_script("conv_awq.py", *common, "--w_bit", 4, "--fakequant_output", out, "--overwrite")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "cheatsheet.pt").read_bytes() == b"not ours either"
    weight = load_file(str(next(out.glob("model-*.safetensors"))))["model.layers.0.mlp.up_proj.weight"]
    assert 8 < len(torch.unique(weight[0])) <= 16 * 2  # 4-bit now: up to 16 levels per group of 32
    # a folder these scripts did not write is never replaced, --overwrite or not
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    result = run_script("conv_awq.py", *common, "--fakequant_output", foreign, "--overwrite")
    assert_input_error(result, "did not write", "thesis.tex")
    assert (foreign / "thesis.tex").read_text() == "years of work" and len(list(foreign.iterdir())) == 1


def test_interrupted_demo_leaves_nothing_that_blocks_the_next_run(tmp_path):
    out = tmp_path / "demo"
    command = [sys.executable, str(ROOT / "demo.py"), "--quick", "--output", str(out), "--quiet", "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(tmp_path.glob(".demo.tmp-*/original/config.json")) and time.time() < deadline:
        assert process.poll() is None, "the demo ended before it could be interrupted"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()  # the half-built folder never took the final name
    assert list(tmp_path.glob(".demo.tmp-*"))
    result = run_script("demo.py", "--quick", "--output", out, "--quiet", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "decdec" / "cheatsheet.pt").is_file() and (out / "results.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # the killed run's folder is gone
    (out / "my-notes.txt").write_text("keep me")
    again = run_script("demo.py", "--quick", "--output", out, "--quiet", "--device", "cpu", "--overwrite",
                       "--train_steps", 5)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "my-notes.txt").read_text() == "keep me" and (out / "results.json").is_file()
    assert "(simulate DecDEC on that folder (evaluate.py): " in again.stderr  # each step: its own time
    here = tmp_path / "cwd"
    here.mkdir()
    (here / "data.csv").write_text("a,b")
    refused = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--quick", "--output", ".", "--overwrite"],
                             cwd=here, capture_output=True, text=True, timeout=300)
    assert_input_error(refused, "did not write")
    assert (here / "data.csv").read_text() == "a,b"


def test_identical_and_swapped_models(pair, tmp_path):
    original, quantized = pair
    assert_input_error(run_script("cheatsheet.py", "--original_model", original, "--quantized_model", original,
                                  "--save_path", tmp_path / "a"), "is the --original_model itself")
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    assert_input_error(run_script("cheatsheet.py", "--original_model", original, "--quantized_model", copy,
                                  "--save_path", tmp_path / "b"), "equals the original", "every residual is zero")
    assert not (tmp_path / "b" / "cheatsheet.pt").exists() and not (tmp_path / "b" / PARTS_DIR).exists()
    right = run_script("cheatsheet.py", "--original_model", original, "--quantized_model", quantized,
                       "--save_path", tmp_path / "c", "--quiet")
    assert right.returncode == 0 and "are the two swapped?" not in right.stderr
    swapped = run_script("cheatsheet.py", "--original_model", quantized, "--quantized_model", original,
                         "--save_path", tmp_path / "d", "--quiet")
    assert swapped.returncode == 0 and "warning:" in swapped.stderr and "are the two swapped?" in swapped.stderr


def test_disk_full_part_way_keeps_only_the_resume_parts(pair, tmp_path, capsys, monkeypatch):
    original, quantized = pair
    save = tmp_path / "out"
    argv = ["--original_model", original, "--quantized_model", quantized, "--save_path", save, "--quiet",
            "--device", "cpu"]
    real_write = PartStore.write

    def write_until_full(self, layer, results):
        if layer == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, layer, results)
    monkeypatch.setattr(PartStore, "write", write_until_full)
    code, stderr = run_in_process(cheatsheet.main, argv, capsys)
    line = one_error_line(stderr)
    assert code == 1 and "No space left on device" in line and "resumes" in line, stderr
    assert sorted(p.name for p in save.iterdir()) == [PARTS_DIR]
    assert sorted(p.name for p in (save / PARTS_DIR).iterdir()) == ["fingerprint.json", "layer-00000.safetensors"]
    monkeypatch.setattr(PartStore, "write", real_write)
    code, stderr = run_in_process(cheatsheet.main, argv, capsys)
    assert code == 0, stderr
    assert sorted(p.name for p in save.iterdir()) == ["cheatsheet.pt"]
    fresh = run_script("cheatsheet.py", *argv[:5], tmp_path / "fresh", "--quiet", "--device", "cpu")
    assert fresh.returncode == 0
    resumed, direct = (torch.load(p / "cheatsheet.pt", weights_only=True) for p in (save, tmp_path / "fresh"))
    assert all(torch.equal(resumed[i][m][f], direct[i][m][f]) for i in range(2) for m in direct[i]
               for f in direct[i][m])


def test_disk_full_while_writing_the_final_file(pair, tmp_path, capsys, monkeypatch):
    """The real zip writer failing: the OSError behind torch's RuntimeError is what the user sees."""
    original, quantized = pair
    save = tmp_path / "out"
    import common.io.outputs as outputs
    real_open = open

    class FullDisk:
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, data):
            self.written += len(memoryview(data).cast("B"))
            if self.written > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.handle.write(data)

        def flush(self):
            self.handle.flush()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(outputs, "open", lambda path, mode: FullDisk(real_open(path, mode)), raising=False)
    code, stderr = run_in_process(cheatsheet.main, ["--original_model", original, "--quantized_model", quantized,
                                                    "--save_path", save, "--device", "cpu"], capsys)
    line = one_error_line(stderr)
    assert code == 1 and line.startswith(f"error: writing {save / 'cheatsheet.pt'}: No space left on device"), line
    assert sorted(p.name for p in save.iterdir()) == [PARTS_DIR]  # no temporary left


def test_too_little_free_space_is_refused_before_any_work(pair, tmp_path, capsys, monkeypatch):
    original, quantized = pair
    import common.io.outputs as outputs
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 0, 1 << 20))
    code, stderr = run_in_process(cheatsheet.main, ["--original_model", original, "--quantized_model", quantized,
                                                    "--save_path", tmp_path / "out"], capsys)
    line = one_error_line(stderr)
    assert code == 2 and "free space" in line and "1.0 MiB" in line, line
    assert not (tmp_path / "out").exists()


def test_an_unwritable_output_is_named_in_one_line(pair, tmp_path, capsys, monkeypatch):
    """A read-only folder (root writes anywhere, so the refusal is simulated where the lock is made) and
    a folder that cannot be created: the output path is named, never the run's internal lock file."""
    original, quantized = pair
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)
    monkeypatch.setattr(os, "open", read_only)
    code, stderr = run_in_process(cheatsheet.main, ["--original_model", original, "--quantized_model", quantized,
                                                    "--save_path", tmp_path / "ro"], capsys)
    line = one_error_line(stderr)
    assert code == 2 and f"--save_path {tmp_path / 'ro' / 'cheatsheet.pt'}: cannot write in" in line, line
    assert "Read-only file system" in line and ".lock" not in line
    assert not (tmp_path / "ro").exists()
    monkeypatch.setattr(os, "open", real_open)
    result = run_script("cheatsheet.py", "--original_model", original, "--quantized_model", quantized,
                        "--save_path", "/proc/decdec-no-such/out")
    assert_input_error(result, "--save_path /proc/decdec-no-such/out/cheatsheet.pt: cannot create the folder")


def test_stale_temporaries_removed_and_one_run_per_output(pair, tmp_path):
    original, quantized = pair
    save = tmp_path / "out"
    save.mkdir()
    args = ["--original_model", original, "--quantized_model", quantized, "--save_path", save, "--quiet"]
    stale = save / ".cheatsheet.pt.tmp-999999"
    with output_lock(save / "cheatsheet.pt"):  # another run holds this output
        stale.write_bytes(b"x" * 1000)  # as if a killed run had left it
        (save / PARTS_DIR).mkdir()
        (save / PARTS_DIR / ".layer-00000.safetensors.tmp-999999").write_bytes(b"half")
        assert_input_error(run_script("cheatsheet.py", *args), "another run", str(os.getpid()))
        assert stale.exists()
    result = run_script("cheatsheet.py", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in save.iterdir()) == ["cheatsheet.pt"]
    # the kernel drops the lock of a killed holder: the next run proceeds
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from pathlib import Path; from common.io.outputs import output_lock\n"
                               "with output_lock(Path(sys.argv[2])):\n    print('held', flush=True); time.sleep(60)",
                               str(ROOT), str(save / "thresholds.pt")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(Exception, match="another run"):
        with output_lock(save / "thresholds.pt"):
            pass
    holder.kill()
    holder.wait()
    with output_lock(save / "thresholds.pt"):
        pass
    assert sorted(p.name for p in save.iterdir()) == ["cheatsheet.pt", ".thresholds.pt.lock"] or \
        sorted(p.name for p in save.iterdir()) == ["cheatsheet.pt"]


def test_concurrent_runs_on_one_output(pair, tmp_path):
    original, quantized = pair
    save = tmp_path / "out"
    command = [sys.executable, str(ROOT / "cheatsheet.py"), "--original_model", str(original), "--quantized_model",
               str(quantized), "--save_path", str(save), "--quiet"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results  # serialized by chance, or the second refused
    for code, stderr in results:
        if code == 2:
            assert "another run" in one_error_line(stderr) or "already exists" in one_error_line(stderr)
    assert sorted(p.name for p in save.iterdir()) == ["cheatsheet.pt"]
    assert len(torch.load(save / "cheatsheet.pt", weights_only=True)) == 2


def test_weight_beyond_float16_is_named_with_its_value(pair, tmp_path):
    original, quantized = pair
    bf16 = tmp_path / "bf16"
    shutil.copytree(original, bf16)
    file = next(bf16.glob("*.safetensors"))
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(file)).items()}
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = 1.5e5
    save_file(tensors, str(file), metadata={"format": "pt"})
    result = run_script("cheatsheet.py", "--original_model", bf16, "--quantized_model", quantized,
                        "--save_path", tmp_path / "out")
    assert_input_error(result, "model.layers.1.mlp.up_proj.weight", "149504", "beyond the float16 range")
    result = run_script("conv_awq.py", "--model_path", bf16, "--q_group_size", 32, "--fakequant_output",
                        tmp_path / "fq")
    assert_input_error(result, "mlp.up_proj.weight", "beyond the float16 range")
    assert "after scaling" not in result.stderr


def test_hub_failures_say_why(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = run_script("cheatsheet.py", "--original_model", "someone/no-such-model", "--quantized_model", "x/y",
                        "--save_path", tmp_path / "o", env=env)
    assert_input_error(result, "someone/no-such-model", "HF_HUB_OFFLINE", "local directory")
    env = {**env, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there
    started = time.time()
    result = run_script("cheatsheet.py", "--original_model", "someone/no-such-model", "--quantized_model", "x/y",
                        "--save_path", tmp_path / "o", env=env)
    assert_input_error(result, "cannot be reached", "HF_HUB_OFFLINE=1")
    assert time.time() - started < 60


def test_a_named_dataset_without_network_fails_within_seconds(pair, tmp_path):
    """No hub to reach (nothing listens on the endpoint): the datasets client would retry for ~30 s; it
    is asked for its cache only, which fails at once, and the line says why."""
    original, _ = pair
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": "http://127.0.0.1:9"}
    started = time.time()
    result = run_script("thresholds.py", "--model_path", original, "--save_path", tmp_path / "t", "--dataset", "c4",
                        env=env)
    assert_input_error(result, "--dataset c4", "the Hugging Face hub cannot be reached", "pass a local file")
    assert time.time() - started < 20
    assert not (tmp_path / "t").exists()
