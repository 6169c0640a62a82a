"""Generation: exported models' generate() with a KV cache equals a cache-free greedy loop; the
``python -m fms_dyt.generate`` CLI; the sample printed at the end of a training run."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from fms_dyt.export import main as export_main
from fms_dyt.generate import SAMPLE_PROMPT, SAMPLE_TOKENS, main as generate_main, print_final_sample

REPO = Path(__file__).resolve().parents[1]
NEW = 20


def _export(tmp_path, norm):
    out = tmp_path / norm
    assert export_main(["init", str(out), "--format", "fms_dyt", "model=tiny", f"norm={norm}", "seed=5"]) == 0
    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()


def _greedy_without_cache(model, ids, n):
    """The reference: the whole sequence through the training forward for every new token."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model.model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def _prompt(length, seed):
    return torch.randint(3, 32000, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("norm", ["dyt", "rmsnorm"])
def test_generate_uses_the_cache_and_equals_a_cache_free_greedy_loop(tmp_path, norm):
    model = _export(tmp_path, norm)
    seen = []  # tokens per forward: the whole prompt once, then one token at a time
    model.model.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    ids = _prompt(7, seed=1)
    out = model.generate(ids, max_new_tokens=NEW, do_sample=False)
    assert seen == [7] + [1] * (NEW - 1)
    assert torch.equal(out, _greedy_without_cache(model, ids, NEW))


def test_left_padded_batch_continues_each_prompt_as_alone(tmp_path):
    model = _export(tmp_path, "dyt")
    long, short = _prompt(9, seed=2), _prompt(4, seed=3)
    pad = 0
    batch = torch.cat([long, torch.cat([torch.full((1, 5), pad), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    out = model.generate(batch, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=pad)
    assert torch.equal(out[0, 9:], _greedy_without_cache(model, long, NEW)[0, 9:])
    assert torch.equal(out[1, 9:], _greedy_without_cache(model, short, NEW)[0, 4:])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-step quickstart run: its stdout (with the end-of-run sample) and its directory."""
    run = tmp_path_factory.mktemp("gen") / "run"
    done = subprocess.run(
        [sys.executable, "train.py", "experiment=quickstart", "train.max_steps=2", "train.seq_len=32",
         "train.micro_batch_size=2", "train.global_batch_tokens=64", "logging.wandb.mode=disabled",
         f"run_dir={run}"],
        cwd=REPO, timeout=600, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout, run


def test_cli_greedy_matches_the_end_of_run_sample_and_sampling_follows_the_seed(trained, capsys):
    stdout, run = trained
    header = f"sample ({SAMPLE_TOKENS} greedy tokens after {SAMPLE_PROMPT!r}):\n"
    assert header in stdout and stdout.index(header) > stdout.index("done: 2 steps")
    sample = stdout.split(header, 1)[1]
    assert generate_main([str(run), "--prompt", SAMPLE_PROMPT, "--max-new-tokens", str(SAMPLE_TOKENS)]) == 0
    assert sample == SAMPLE_PROMPT + capsys.readouterr().out

    texts = []
    for seed in (1, 1, 2):
        step = run / "checkpoints" / "step_2"
        assert generate_main([str(step), "--prompt", "x = ", "--max-new-tokens", "12", "--temperature", "1.5",
                              "--top-k", "1000", "--seed", str(seed)]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] != texts[2]


def test_cli_refuses_a_missing_path_and_bad_values(tmp_path, capsys):
    assert generate_main([str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "CKPT_OR_DIR" in capsys.readouterr().err
    for bad, name in ((["--max-new-tokens", "0"], "--max-new-tokens=0"), (["--temperature", "-1"], "--temperature=-1"),
                      (["--top-k", "5"], "--top-k=5")):
        assert generate_main([str(tmp_path), "--prompt", "hi", *bad]) == 2
        assert name in capsys.readouterr().err


def test_end_of_run_sample_failure_is_a_warning(tmp_path, caplog, capsys):
    broken = tmp_path / "checkpoints" / "step_1"
    broken.mkdir(parents=True)
    (broken / "meta.json").write_text("{}")  # no config.yaml, no shards
    with caplog.at_level(logging.WARNING, logger="fms_dyt"):
        print_final_sample(broken, n_params=1000)
    assert f"no sample from {broken}" in caplog.text
    print_final_sample(broken, n_params=10**12)  # too large to load on rank 0: the command instead
    assert capsys.readouterr().out == f"sample: python -m fms_dyt.generate {broken} --prompt 'def'\n"
