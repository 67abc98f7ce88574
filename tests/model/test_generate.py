"""tourray generate: prompt rendering (chat template and plain), greedy decoding against a manual
argmax loop, batching, limits, eos, the prompts file, the side-by-side section, the command."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from conftest import REPO, chatty_copy
from tourray.errors import UserError
from tourray.model.generate import Generator, add_parser, cmd_generate, generate, read_prompts, side_by_side
from tourray.model.prompt import PromptFormat

SYS = "You are a careful tour guide."
PROMPTS = ["Tell me about the Opera House.", "Hi", "When was the Bell Tower in Xi'an built, and why was it moved?",
           "x", "The Small Wild Goose Pagoda"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP spin contention
    (10x slower with two threads under load). Restored afterwards for the other test modules."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def chatty(llama_model, qwen3_model, tmp_path_factory):
    """{"llama": chat template, "qwen3": plain format} -> loaded Generator with the system prompt."""
    return {name: Generator(str(chatty_copy(src, tmp_path_factory.mktemp(f"chatty-{name}"), seed)), SYS)
            for name, src, seed in (("llama", llama_model, 2), ("qwen3", qwen3_model, 3))}


# -- rendering -------------------------------------------------------------------------------
def test_chat_template_prompt_holds_system_and_user_like_capture(llama_model):
    g = Generator(str(llama_model), SYS)
    assert g.fmt.chat
    text = g.render(PROMPTS[0])
    assert text == g.tok.apply_chat_template([{"role": "system", "content": SYS}, {"role": "user", "content": PROMPTS[0]}],
                                             tokenize=False, add_generation_prompt=True)
    assert f"system\n{SYS}<|endoftext|>" in text and f"user\n{PROMPTS[0]}<|endoftext|>" in text
    assert text.index(SYS) < text.index(PROMPTS[0])
    # the same tokens capture's PromptFormat gives the prompt as the user turn (this template has no
    # generation prompt of its own), so generation sees the system prompt exactly as capture does
    capture = PromptFormat(g.tok, system_prompt=SYS, text_role="user").encode(PROMPTS[0])
    assert g.encode(PROMPTS[0]) == capture.input_ids.tolist()
    bare = Generator(str(llama_model)).render("Hi")
    assert "system" not in bare and bare == "<|bos|>user\nHi<|endoftext|>\n"
    # a template with a generation prompt (as real ones have) opens the assistant turn
    g.fmt.tok.chat_template += "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
    assert g.render("Hi") == f"<|bos|>system\n{SYS}<|endoftext|>\n<|bos|>user\nHi<|endoftext|>\n<|bos|>assistant\n"


def test_plain_format_without_a_chat_template(qwen3_model, llama_model):
    g = Generator(str(qwen3_model), SYS)
    assert not g.fmt.chat
    assert g.render("Hi there") == f"<|bos|>{SYS}\n\nHi there\n"
    assert Generator(str(qwen3_model)).render("Hi there") == "<|bos|>Hi there\n"
    assert Generator(str(llama_model), SYS, chat_template=False).render("Hi") == f"<|bos|>{SYS}\n\nHi\n"
    # a tokenizer that adds bos itself (as Llama's do) must not get it twice: the text holds it
    from tokenizers import processors

    bos = g.tok.bos_token_id
    g.tok._tokenizer.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", bos)])
    assert g.tok("Hi")["input_ids"][0] == bos
    ids = g.encode("Hi there")
    assert ids[0] == bos and ids.count(bos) == 1


# -- decoding --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_greedy_equals_a_manual_argmax_loop(chatty, name):
    import torch

    g, k = chatty[name], 6
    for prompt in PROMPTS[:3]:
        ids = g.encode(prompt)
        want = []
        with torch.no_grad():
            for _ in range(k):
                logits = g.model(input_ids=torch.tensor([ids + want]), use_cache=False).logits
                want.append(int(logits[0, -1].argmax()))
                if want[-1] in g.eos_ids:
                    break
        got = g([prompt], max_new_tokens=k)[0]
        assert got["token_ids"] == want, prompt
        assert got["text"] == g.tok.decode([t for t in want if t not in g.eos_ids], skip_special_tokens=True)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_batched_equals_one_at_a_time(chatty, name):
    g = chatty[name]
    lengths = {len(g.encode(p)) for p in PROMPTS}
    assert len(lengths) >= 4  # real padding in every batch
    alone = [g([p], max_new_tokens=12, batch_size=1)[0] for p in PROMPTS]
    assert len({tuple(r["token_ids"]) for r in alone}) == len(PROMPTS)  # distinct outputs: a mix-up would show
    for bs in (2, 8):
        together = g(PROMPTS, max_new_tokens=12, batch_size=bs)
        assert [r["prompt"] for r in together] == PROMPTS  # order kept although batches are sorted by length
        assert together == alone, bs


def test_max_new_tokens_is_respected(chatty):
    g = chatty["llama"]
    for n in (1, 5):
        for r in g(PROMPTS, max_new_tokens=n):
            assert len(r["token_ids"]) == r["n_new_tokens"]
            assert r["n_new_tokens"] == n if not r["stopped"] else r["n_new_tokens"] <= n
    longer = g(PROMPTS[:1], max_new_tokens=9)[0]
    assert not longer["stopped"] and longer["n_new_tokens"] == 9
    assert g(PROMPTS[:1], max_new_tokens=5)[0]["token_ids"] == longer["token_ids"][:5]
    with pytest.raises(UserError, match="--max-new-tokens"):
        g(PROMPTS, max_new_tokens=0)


def test_eos_from_the_generation_config_stops_and_is_not_in_the_text(chatty, tmp_path):
    g = chatty["llama"]
    free = g(PROMPTS[:1], max_new_tokens=10)[0]["token_ids"]
    k = next(i for i in range(1, len(free)) if free[i] not in free[:i])  # first fresh token after the first
    g.model.save_pretrained(tmp_path)
    g.tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "generation_config.json").read_text())
    cfg["eos_token_id"] = [g.tok.eos_token_id, free[k]]
    (tmp_path / "generation_config.json").write_text(json.dumps(cfg))
    r = generate(str(tmp_path), PROMPTS[:1], system_prompt=SYS, max_new_tokens=10)[0]
    assert r["stopped"] and r["n_new_tokens"] == k + 1 and r["token_ids"] == free[: k + 1]
    assert r["text"] == g.tok.decode(free[:k], skip_special_tokens=True)


def test_a_missing_model_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--model: no such checkpoint folder"):
        generate(str(tmp_path / "nope"), ["Hi"])


# -- the prompts file ------------------------------------------------------------------------
def test_prompts_file_skips_comments_and_blank_lines(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_bytes("\ufeff# held-out stops\n\nTell me about the Opera House.\r\n   \n  # indented comment\n"
                  "西安城墙有多长？\nHi # not a comment\n".encode())
    assert read_prompts(p) == ["Tell me about the Opera House.", "西安城墙有多长？", "Hi # not a comment"]


def test_prompts_file_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match=f"--prompts: {tmp_path / 'missing.txt'} does not exist"):
        read_prompts(tmp_path / "missing.txt")
    for name, data in (("empty.txt", b""), ("only-comments.txt", b"# a\n\n  \n#b\n")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=f"--prompts: {tmp_path / name} has no prompts"):
            read_prompts(tmp_path / name)
    (tmp_path / "latin1.txt").write_bytes("ok\n# fine\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match=f"--prompts: {tmp_path / 'latin1.txt'} line 3 is not UTF-8"):
        read_prompts(tmp_path / "latin1.txt")
    with pytest.raises(UserError, match="is a folder"):
        read_prompts(tmp_path)


# -- the report section ----------------------------------------------------------------------
def test_side_by_side_puts_every_variant_under_every_prompt():
    def res(tag):
        return [{"prompt": p, "text": f"{tag} says {i}\n```python\nsecond line {tag}", "n_new_tokens": 7,
                 "stopped": i == 0} for i, p in enumerate(PROMPTS[:3])]

    md = side_by_side({"drop-3-4": res("D"), "original": res("O"), "drop-1": res("E")})
    heads = [md.index(f"### {i}. {p}") for i, p in enumerate(PROMPTS[:3], 1)] + [len(md)]
    assert heads == sorted(heads)
    for i in range(3):
        part = md[heads[i]: heads[i + 1]]
        pos = [part.index(f"**{name}**") for name in ("original", "drop-3-4", "drop-1")]
        assert pos == sorted(pos)  # original first, then the order given
        for tag in "ODE":
            assert f"> {tag} says {i}\n> ```python\n> second line {tag}" in part
    body = [line for line in md.splitlines() if line and not line.startswith(("#", "**"))]
    assert all(line.startswith(">") for line in body)  # every text line quoted: fences stay inside
    assert "stopped at eos" in md and "cut at max tokens" in md
    missing = side_by_side({"original": res("O"), "drop-1": res("E")[:1]})
    assert missing.count("_(no output)_") == 2


# -- the command -----------------------------------------------------------------------------
def _parser():
    top = argparse.ArgumentParser(prog="tourray")
    sub = top.add_subparsers(dest="command", required=True)

    def command(name, fn, help):  # as in tourray.cli.parser()
        p = sub.add_parser(name, help=help, description=help, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(fn=fn)
        return p

    add_parser(command)
    return top


def test_cmd_generate_prints_or_writes_jsonl(chatty, tmp_path, capsys):
    model = chatty["llama"].model.name_or_path
    prompts, sysfile = tmp_path / "prompts.txt", tmp_path / "system.md"
    prompts.write_text("# stops\n" + "\n".join(PROMPTS[:3]) + "\n", encoding="utf-8")
    sysfile.write_text(SYS + "\n", encoding="utf-8")
    want = generate(model, PROMPTS[:3], system_prompt=SYS, max_new_tokens=4)
    base = ["generate", "--model", model, "--prompts", str(prompts), "--system-prompt", str(sysfile),
            "--max-new-tokens", "4"]
    args = _parser().parse_args(base + ["--out", str(tmp_path / "o" / "gen.jsonl")])
    assert args.fn is cmd_generate and cmd_generate(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "o" / "gen.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [{k: v for k, v in r.items() if k != "model"} for r in rows] == want
    assert all(r["model"] == model for r in rows)
    capsys.readouterr()
    assert cmd_generate(_parser().parse_args(base + ["--batch-size", "1"])) == 0
    out = capsys.readouterr().out
    for r in want:
        assert f"### {r['prompt']}\n{r['text']}\n({r['n_new_tokens']} tokens" in out


def test_cmd_generate_refusals_and_help(qwen3_model, tmp_path, capsys):
    from tourray.config import guarded

    args = _parser().parse_args(["generate", "--model", str(qwen3_model), "--prompts", str(tmp_path / "none.txt")])
    assert guarded(args.fn, args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --prompts:") and "none.txt does not exist" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["generate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:\n  tourray generate --model" in out and "--max-new-tokens N" in out


def test_importing_the_module_loads_no_torch():
    code = "import sys, tourray.model.generate\nprint('torch' in sys.modules, 'transformers' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["False", "False"]
