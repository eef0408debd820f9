"""Rebuild sample_models/docs_lm/ (a small GPT-2-style causal LM with its own tokenizer) and its
text files, from the docstrings of Python's standard library: text every Python install has, so
nothing is downloaded.

Run from the repository root, either way:

    python sample_models/make_lm.py
    python -m sample_models.make_lm

Needs torch, safetensors and transformers (the `hf` extra; `tokenizers` comes with it).

Text: `inspect.getdoc` of each module in TRAIN_MODULES (then HELDOUT_MODULES), of its public
classes and functions (those defined in that module, by sorted name) and of the classes'
public methods, each docstring once, joined by blank lines. The text is collected after torch
and transformers are imported (transformers adds three methods to logging.Logger, whose
docstrings are then in it). The docstrings are those of the running Python (3.11 made these
files), so another Python or transformers version gives a slightly different text; the held-out
and calibration texts are committed, so evaluation never depends on that.

    docs_lm/                 config.json, generation_config.json, model.safetensors (float32),
                             tokenizer.json, tokenizer_config.json: a GPT2LMHeadModel
                             (Conv1D layers, head tied to the token embedding)
    docs_heldout.txt         the docstrings of HELDOUT_MODULES (never trained on)
    docs_calib.txt           the first CALIB_CHARS characters of the training text

Tokenizer: byte-level BPE (as GPT-2's), VOCAB tokens, trained with `tokenizers` on the training
text. Model: N_LAYER blocks, N_EMBD wide, N_HEAD heads, N_POSITIONS positions. Training: STEPS
AdamW steps on batches of BATCH random windows of CONTEXT tokens (a seeded generator), one-cycle
learning rate, one thread and deterministic algorithms, so a rerun on the same Python, torch and
tokenizers versions writes the same bytes (the BPE trainer breaks ties the same way for the same
text). Prints the held-out perplexity. About 4 minutes of one core (15 on a busy machine).
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "docs_lm")
SEED = 0
VOCAB, N_EMBD, N_LAYER, N_HEAD, N_POSITIONS = 2048, 128, 3, 4, 256
CONTEXT, BATCH, STEPS, LR = 128, 16, 600, 3e-3
CALIB_CHARS = 20_000
EOT = "<|endoftext|>"

TRAIN_MODULES = (
    "argparse ast asyncio base64 bisect calendar collections configparser contextlib copy csv dataclasses "
    "datetime decimal difflib email enum fractions functools glob gzip hashlib heapq hmac html http.client "
    "http.server inspect io ipaddress itertools json logging mailbox math mimetypes operator os pathlib pickle "
    "pprint queue random re sched secrets shlex shutil socket sqlite3 statistics string struct subprocess "
    "tarfile tempfile textwrap threading time tokenize traceback typing unittest urllib.parse urllib.request "
    "uuid warnings weakref xml.dom.minidom xml.etree.ElementTree zipfile zlib array binascii builtins bz2 "
    "cmath cmd codeop colorsys compileall concurrent.futures contextvars dis doctest filecmp fileinput getopt "
    "gettext graphlib importlib keyword linecache lzma marshal mmap modulefinder multiprocessing numbers "
    "optparse pdb pkgutil platform plistlib profile pstats py_compile pyclbr pydoc quopri reprlib runpy select "
    "selectors shelve signal socketserver ssl stat symtable sys sysconfig tabnanny timeit tomllib trace "
    "tracemalloc types unicodedata wsgiref.simple_server xml.sax xmlrpc.client zoneinfo"
).split()
HELDOUT_MODULES = "fnmatch ftplib imaplib poplib smtplib wave zipimport codecs locale netrc".split()


def docstrings(module_name: str) -> list[str]:
    """The module's docstring, then those of its public classes (and their public methods) and
    functions, by sorted name; each object once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(module_name)
    found: list[str] = []
    seen: set[int] = set()

    def add(obj: object) -> None:
        doc = inspect.getdoc(obj)
        if doc and id(obj) not in seen:
            seen.add(id(obj))
            found.append(doc)

    add(module)
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            add(obj)
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and (inspect.isfunction(member) or inspect.ismethoddescriptor(member)):
                    add(member)
        elif inspect.isfunction(obj):
            add(obj)
    return found


def corpus(modules: list[str]) -> str:
    return "\n\n".join(doc for name in modules for doc in docstrings(name)) + "\n"


def train_tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    return tok


def main() -> None:
    import transformers  # before the text is collected: see the module docstring

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    t_start = time.perf_counter()
    train_text, heldout_text = corpus(TRAIN_MODULES), corpus(HELDOUT_MODULES)
    with open(os.path.join(HERE, "docs_heldout.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write(heldout_text)
    with open(os.path.join(HERE, "docs_calib.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write(train_text[:CALIB_CHARS].rsplit("\n\n", 1)[0] + "\n")  # whole docstrings

    tok = train_tokenizer(train_text)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, model_max_length=N_POSITIONS,
    )
    ids = torch.tensor(tok.encode(train_text).ids, dtype=torch.long)  # (T,)
    held = torch.tensor(tok.encode(heldout_text).ids, dtype=torch.long)

    torch.manual_seed(SEED)
    eot = tok.token_to_id(EOT)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=N_POSITIONS, n_embd=N_EMBD, n_layer=N_LAYER, n_head=N_HEAD,
        bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=True,
    )
    model = transformers.GPT2LMHeadModel(config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=STEPS, pct_start=0.05)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    t0 = time.perf_counter()
    for step in range(STEPS):
        starts = torch.randint(0, ids.numel() - CONTEXT, (BATCH,), generator=gen)
        batch = torch.stack([ids[s : s + CONTEXT] for s in starts.tolist()])  # (B, CONTEXT)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == STEPS - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.perf_counter() - t0:.0f}s", flush=True)
    model.eval()
    model.generation_config.pad_token_id = eot
    model.save_pretrained(OUT)
    fast.save_pretrained(OUT)
    # transformers 5 names its fast-tokenizer class TokenizersBackend, which 4.x does not know;
    # both load PreTrainedTokenizerFast from tokenizer.json
    config_path = os.path.join(OUT, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        tok_config = json.load(f)
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(tok_config, f, indent=2, sort_keys=True)
        f.write("\n")
    for name in os.listdir(OUT):
        os.chmod(os.path.join(OUT, name), 0o644)  # safetensors creates files 0600

    # Held-out perplexity, non-overlapping windows of CONTEXT tokens (qlin eval --text uses a stride).
    with torch.no_grad():
        n = (held.numel() - 1) // CONTEXT * CONTEXT
        x = held[: n + 1]
        nll = sum(
            model(input_ids=x[i : i + CONTEXT][None], labels=x[i : i + CONTEXT][None]).loss.item() * (CONTEXT - 1)
            for i in range(0, n, CONTEXT)
        )
        count = (n // CONTEXT) * (CONTEXT - 1)
    print(f"training text {len(train_text):,} chars, {ids.numel():,} tokens; held-out {held.numel():,} tokens")
    print(f"held-out perplexity (windows of {CONTEXT}): {math.exp(nll / count):.2f} (vocabulary {VOCAB})")
    print(f"parameters {sum(p.numel() for p in model.parameters()):,}; total {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, os.path.dirname(HERE))
    main()
