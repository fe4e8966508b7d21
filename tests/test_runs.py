"""Runs a user can trust (issue 20, items 1-4): one run per output dir, a resume only from this run's
checkpoints, what is recorded is what ran, refusals before the encode, and a run that says what it
does (summary, checkpoints, eval loss, held-out files, a clean stop on SIGINT / SIGTERM)."""

import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from cogfun import cli
from cogfun.config import ConfigError, PrecomputeConfig, TrainConfig
from cogfun.models import ModelError
from test_train import DATA, ROOT, VENV, base_args, cli_env, losses, setup  # noqa: F401 (fixture)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def config(setup, out, **over) -> TrainConfig:
    kw = dict(pretrained_model_name_or_path=str(setup["model"]), shard_dir=str(setup["shards"]), output_dir=str(out),
              max_train_steps=2, checkpointing_steps=1, mixed_precision="no", rank=4, network_alpha=2.0,
              learning_rate=1e-3, dataloader_num_workers=0, report_to="none", **DATA)
    return TrainConfig(**{**kw, **over})


def train(cfg):
    from cogfun.stages.train import train as run

    return run(cfg)


def invoke(args):
    result = CliRunner().invoke(cli.main, args)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def state(ckpt: Path) -> dict:
    return json.loads((ckpt / "cogfun_state.json").read_text())


# ------------------------------------------------------------------ 1. one run per output dir

def test_a_second_run_into_an_output_dir_is_refused_unless_overwrite(setup, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "mine.txt").write_text("not cogfun's")   # a user's files are no run, and never deleted
    (out / "notes.txt").write_text("not cogfun's")
    train(config(setup, out, max_train_steps=3))
    before = (out / "train_log.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"holds a run \(run_config.json, train_log.jsonl, .*3 checkpoint"
                                          r"\(s\) checkpoint-1 \.\. checkpoint-3\)\. One run per output dir: .*"
                                          r"--resume_from_checkpoint latest.*--overwrite"):
        train(config(setup, out, max_train_steps=1))
    assert (out / "train_log.jsonl").read_text() == before and (out / "checkpoint-3").is_dir()
    capsys.readouterr()
    result = train(config(setup, out, max_train_steps=1, overwrite=True))
    said = capsys.readouterr().out
    assert f"--overwrite: deleted the previous run in {out}: run_config.json, train_log.jsonl" in said
    assert "checkpoint-3" in said
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]   # nothing of the old run left
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1]
    assert result["global_step"] == 1
    assert (out / "logs" / "mine.txt").is_file() and (out / "notes.txt").is_file()
    # the one-launch form refuses before precompute encodes anything
    fresh = tmp_path / "fresh-shards"
    with pytest.raises(ConfigError, match="holds a run"):
        from cogfun.pipelines.precompute_then_train import run

        run(config(setup, out, shard_dir=str(fresh), train_data_meta=str(setup["meta"]),
                   train_data_dir=str(setup["meta"].parent)))
    assert not fresh.exists()


def test_resume_refuses_another_runs_checkpoint_naming_every_difference(setup, tmp_path):
    out = tmp_path / "out"
    train(config(setup, out, max_train_steps=2))
    ckpt = out / "checkpoint-2"
    record = state(ckpt)
    assert record["run"]["shards_fingerprint"] == json.loads((setup["shards"] / "manifest.json").read_text())["fingerprint"]
    # another run's checkpoint (other shards, another transformer) found by 'latest' in this dir
    record["run"].update(shards_fingerprint="f" * 64, transformer="0" * 64)
    (ckpt / "cogfun_state.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError) as err:
        train(config(setup, out, max_train_steps=4, resume_from_checkpoint="latest", rank=8, network_alpha=4.0,
                     target_name="to_q,to_k", seed=7))
    message = str(err.value)
    assert message.startswith(f"cannot resume from {ckpt}: it belongs to another run:")
    for line in ("shards: it was trained on shards ffffffffffff, --shard_dir holds",
                 "model: it was trained on the transformer of", "LoRA --rank: 4 in the checkpoint, 8 now",
                 "LoRA --network_alpha: 2.0 in the checkpoint, 4.0 now",
                 "LoRA --target_name: to_q,to_k,to_v,ff.0,ff.2 in the checkpoint, to_q,to_k now",
                 "--seed: 42 in the checkpoint, 7 now"):
        assert line in message, message
    assert not (out / "checkpoint-4").exists()


# ------------------------------------------------------------------ 2. what is recorded is what ran

def test_train_from_shards_takes_their_data_settings_and_refuses_contradicting_flags(setup, tmp_path):
    manifest = json.loads((setup["shards"] / "manifest.json").read_text())
    common = ["train", "--pretrained_model_name_or_path", str(setup["model"]), "--shard_dir", str(setup["shards"]),
              "--max_train_steps", "1", "--mixed_precision", "no", "--rank", "4", "--network_alpha", "2",
              "--dataloader_num_workers", "0", "--report_to", "none"]
    # no --train_mode: the inpaint shards' mode is used (before: refused for in_channels)
    out = tmp_path / "plain"
    result = invoke([*common, "--output_dir", str(out)])
    assert result.exit_code == 0, result.output
    recorded = json.loads((out / "run_config.json").read_text())["config"]
    videos = [b for b in manifest["buckets"].values() if b["frames"] > 1]
    big = max(videos, key=lambda b: (b["tokens"], b["height"] * b["width"], b["frames"]))
    assert recorded["train_mode"] == "inpaint" and recorded["video_sample_stride"] == 2
    assert (recorded["validation_num_frames"], recorded["validation_height"], recorded["validation_width"]) == \
        (big["frames"], big["height"], big["width"]) != (17, 512, 512)
    # data flags the shards contradict: refused, all listed, nothing written
    bad = ["--video_sample_stride", "3", "--video_sample_n_frames", "17", "--train_mode", "normal"]
    result = invoke([*common, "--output_dir", str(tmp_path / "refused"), *bad])
    assert result.exit_code == 1
    for text in ("was precomputed with other data settings than these flags give",
                 "--video_sample_stride 3 (the shards: 2)", "--video_sample_n_frames 17 (the shards: 9)",
                 "--train_mode normal (the shards: inpaint)", "--allow_data_flag_mismatch"):
        assert text in result.output, result.output
    assert not (tmp_path / "refused").exists()
    # the same value under the other name of the mode is no contradiction; with the flag: warned, shards' recorded
    out = tmp_path / "allowed"
    result = invoke([*common, "--output_dir", str(out), *bad[:4], "--train_mode", "i2v", "--allow_data_flag_mismatch",
                     "--probe_workers", "3"])
    assert result.exit_code == 0, result.output
    assert "note: precompute-only flags, unused when training from existing shards" in result.output
    assert "--probe_workers 3 (the shards: 8)" in result.output
    assert "WARNING" in result.output and "--video_sample_stride 3 (the shards: 2)" in result.output
    assert "--train_mode" not in result.output.split("WARNING")[1].splitlines()[0]
    recorded = json.loads((out / "run_config.json").read_text())["config"]
    assert (recorded["video_sample_stride"], recorded["video_sample_n_frames"]) == (2, 9)
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        embedded = json.loads(f.metadata()["cogfun_config"])
    assert (embedded["video_sample_stride"], embedded["video_sample_n_frames"]) == (2, 9)


def test_resume_applies_a_changed_learning_rate_from_the_next_step_and_refuses_a_new_batch_order(setup, tmp_path,
                                                                                                capsys):
    out = tmp_path / "out"
    train(config(setup, out, max_train_steps=2, checkpointing_steps=2))
    capsys.readouterr()
    train(config(setup, out, max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="latest",
                 learning_rate=5e-5))
    said = capsys.readouterr().out
    assert "changed since that checkpoint, applied from step 3: max_train_steps 2 -> 4, learning_rate 0.001 -> 5e-05" \
        in said, said
    lrs = {json.loads(line)["step"]: json.loads(line)["lr"] for line in (out / "train_log.jsonl").read_text().splitlines()}
    assert lrs == {1: 1e-3, 2: 1e-3, 3: 5e-5, 4: 5e-5}
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["config"]["learning_rate"] == 5e-5
    assert run_config["changes"] == [{"from_step": 3, "changed": {"learning_rate": [1e-3, 5e-5],
                                                                  "max_train_steps": [2, 4]}}]
    assert state(out / "checkpoint-4")["changes"] == run_config["changes"]   # carried to the next resume
    with pytest.raises(ConfigError) as err:
        train(config(setup, out, max_train_steps=6, checkpointing_steps=2, resume_from_checkpoint="latest",
                     learning_rate=5e-5, train_batch_size=2, gradient_accumulation_steps=2))
    assert "--train_batch_size: 1 in the checkpoint, 2 now (it fixes the batch order" in str(err.value)
    assert "micro-batches per step (--gradient_accumulation_steps x ranks): 1 x 1 in the checkpoint, 2 x 1 now" \
        in str(err.value)


# ------------------------------------------------------------------ 3. refused before the encode

def test_precompute_and_inspect_refuse_a_train_mode_the_model_does_not_fit_before_decoding(setup, tmp_path,
                                                                                           monkeypatch):
    import diffusers

    from cogfun import video
    from cogfun.stages.precompute import precompute

    def forbidden(self, *a, **k):
        raise AssertionError("decoded or encoded before the refusal")

    monkeypatch.setattr(video, "decode", lambda *a, **k: forbidden(None))
    monkeypatch.setattr(diffusers.AutoencoderKLCogVideoX, "__init__", forbidden)
    data = dict(train_data_meta=str(setup["meta"]), train_data_dir=str(setup["meta"].parent), mixed_precision="no",
                dataloader_num_workers=0, **{**DATA, "train_mode": "normal"})
    with pytest.raises(ModelError, match=r"does not fit this run \(nothing was encoded\):\n  in_channels: --train_mode "
                                         r"normal needs 16, the transformer has 33 \(an InP model needs --train_mode "
                                         r"inpaint \(or i2v\)\)"):
        precompute(PrecomputeConfig(pretrained_model_name_or_path=str(setup["model"]),
                                    shard_dir=str(tmp_path / "s1"), **data), progress=False)
    with pytest.raises(ModelError, match=r"--train_mode inpaint needs 33, the transformer has 16 \(a text-to-video"):
        precompute(PrecomputeConfig(pretrained_model_name_or_path=str(setup["t2v"]), shard_dir=str(tmp_path / "s2"),
                                    **{**data, "train_mode": "inpaint"}), progress=False)
    with pytest.raises(ConfigError, match=r"--mask_policy_weights names i2v, which these --mask_policies do not cache "
                                          r"\(cached: block\)"):   # what train would refuse on these shards
        precompute(PrecomputeConfig(pretrained_model_name_or_path=str(setup["model"]), shard_dir=str(tmp_path / "s3"),
                                    **{**data, "train_mode": "inpaint", "mask_policies": "block",
                                       "mask_policy_weights": "i2v=1"}), progress=False)
    assert not any(tmp_path.rglob("*.tar"))
    result = invoke(["inspect-buckets", "--pretrained_model_name_or_path", str(setup["model"]), "--train_data_meta",
                     data["train_data_meta"], "--train_data_dir", data["train_data_dir"]])
    assert result.exit_code == 1 and "in_channels: --train_mode normal needs 16, the transformer has 33" in result.output


def test_help_says_what_each_train_mode_trains():
    text = re.sub(r"-\s+", "-", " ".join(CliRunner().invoke(cli.main, ["train", "--help"]).output.split()))
    assert "normal: text-to-video, for a text-to-video model (transformer in_channels 16)" in text
    assert "inpaint and i2v are two names of one mode" in text and "first frame known = image-to-video" in text


# ------------------------------------------------------------------ 4. saying what is happening

def test_a_run_says_what_it_does_and_lists_the_held_out_files(setup, tmp_path, capsys):
    out = tmp_path / "out"
    result = train(config(setup, out, max_train_steps=2, eval_samples=1.0, eval_steps=2))
    said = capsys.readouterr().out
    manifest = json.loads((setup["shards"] / "manifest.json").read_text())
    held = (out / "eval_files.txt").read_text().splitlines()
    assert len(held) == 1
    from cogfun.shards import read_index

    index = read_index(setup["shards"])
    n_held = sum(1 for s in index["source"] if s == held[0])
    assert f"train: {manifest['num_samples'] - n_held} samples in " in said
    assert f"1 source file(s) ({n_held} samples) held out for the eval loss, listed in {out / 'eval_files.txt'}" in said
    assert "steps per epoch at an effective batch of 1 samples (--train_batch_size 1 x --gradient_accumulation_steps 1" \
        in said
    assert "progress bar: loss = " in said and "step_s = seconds the step took" in said
    (step0, before), (step2, after) = result["eval_losses"]
    assert (step0, step2) == (0, 2)
    assert f"step 0: eval loss {before:.4f}" in said and f"step 2: eval loss {after:.4f}" in said
    for step in (1, 2):
        assert f"step {step}: checkpoint saved to {out / f'checkpoint-{step}'}" in said


def test_sigint_saves_a_checkpoint_at_the_next_step_and_prints_the_resume_command(setup, tmp_path):
    out = tmp_path / "out"
    args = base_args(setup, out, steps=10, ckpt=1000)
    err = open(tmp_path / "stderr.txt", "w+")   # a file, not a pipe: nothing blocks while the test waits
    proc = subprocess.Popen([str(VENV / "python"), str(ROOT / "cli.py"), *args], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=err, text=True)
    log = out / "train_log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "stderr.txt").read_text()[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    err.seek(0)
    stderr = err.read()
    assert proc.returncode == 130, stderr[-3000:]
    m = re.search(r"stopped by SIGINT at step (\d+); checkpoint saved to (\S+)\nResume with:\n  (.*)\n", stderr)
    assert m, stderr[-3000:]
    step, ckpt = int(m.group(1)), Path(m.group(2))
    assert ckpt == out / f"checkpoint-{step}" and state(ckpt)["global_step"] == step < 10
    assert len(losses(out)) == step   # stopped at the step boundary after the signal
    command = shlex.split(m.group(3))
    assert command[-2:] == ["--resume_from_checkpoint", str(ckpt)] and command[1:-2] == args
    assert command[0] == str(ROOT / "cli.py")
    done = subprocess.run([str(VENV / "python"), *command],
                          cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {ckpt} at step {step}" in done.stdout
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(1, 11))


def test_sigterm_is_a_stop_request_until_restored():
    from cogfun.runs import Interrupted, StopRequest

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stop = StopRequest(announce=False).install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)   # a SLURM preemption: no exit, a request
        assert stop.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)    # at once: the same request (terminal + launcher forwarding)
        assert stop.signum == signal.SIGTERM
        stop.at -= StopRequest.REPEAT_S        # later: stop now
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second signal: stop now
    finally:
        stop.restore()
    assert {s: signal.getsignal(s) for s in before} == before   # whatever was there before is back
    assert Interrupted(signal.SIGTERM, 3, Path("o/checkpoint-3")).exit_code == 143


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(setup, tmp_path):
    """2 processes (DDP over gloo): only rank 1 gets SIGTERM (a node's preemption); both ranks save one
    complete checkpoint at the same step boundary and the launch exits non-zero."""
    from test_train import LAUNCHES, free_port

    out = tmp_path / "out"
    launch, env = LAUNCHES["ddp"]
    cmd = [str(VENV / "accelerate"), "launch", *launch, "--main_process_port", str(free_port()), str(ROOT / "cli.py"),
           *base_args(setup, out, steps=10, ckpt=1000)]
    log_file = open(tmp_path / "launch.txt", "w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(env), stdout=log_file, stderr=subprocess.STDOUT, text=True)
    log = out / "train_log.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and log.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "launch.txt").read_text()[-3000:]
        time.sleep(0.01)
    ranks = children_by_rank(proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGTERM)
    proc.wait(timeout=300)
    log_file.seek(0)
    output = log_file.read()
    assert proc.returncode != 0
    m = re.search(r"stopped by SIGTERM at step (\d+); checkpoint saved to (\S+)\nResume with:\n  accelerate launch "
                  r"<the same launch flags> ", output)
    assert m, output[-4000:]
    ckpt = Path(m.group(2))
    assert state(ckpt)["global_step"] == int(m.group(1)) == len(losses(out)) < 10
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()


def children_by_rank(pid: int) -> dict[int, int]:
    """{RANK: pid} of the worker processes the launcher `pid` started (read from /proc)."""
    found = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) != pid:
                continue
            env = dict(e.split(b"=", 1) for e in (p / "environ").read_bytes().split(b"\0") if b"=" in e)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if b"RANK" in env:
            found[int(env[b"RANK"])] = int(p.name)
    return found
