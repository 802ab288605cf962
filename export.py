"""
Export an amlm checkpoint in Hugging Face format, for the official BabyLM 2025 evaluation pipeline
(babylm/evaluation-pipeline-2025) and anything else that loads models through transformers' Auto classes.

Paper: Edman & Fraser, "Mask and You Shall Receive: Optimizing Masked Language Modeling for Pretraining
BabyLMs" (BabyLM Challenge 2025). BabyLM scores entries only through its pipeline, which loads only this format.

    python export.py out/run/latest.pt hf/run                # one checkpoint -> hf/run/
    python export.py out/run hf/run --milestones             # ckpt_<N>M.pt -> hf/run/chck_<N>M/, latest.pt -> hf/run/main/

The folder: config.json (its auto_map points AutoConfig, AutoModel, AutoModelForMaskedLM and
AutoModelForSequenceClassification at modeling_amlm.py, the Hugging Face glue, copied verbatim with the model.py
whose MaskedLM it wraps: together they import only torch and transformers), model.safetensors (written here: an
8-byte header length, a JSON header, raw tensors), and a fast tokenizer (tokenizer.json, tokenizer_config.json,
special_tokens_map.json) that reproduces tokenizer.Tokenizer id for id on text without the special tokens' names;
a "[MASK]" typed in the text is the mask token, as in every Hugging Face MLM tokenizer, so pipeline("fill-mask")
works. Load the model with trust_remote_code=True; the tokenizer is a standard PreTrainedTokenizerFast, which
AutoTokenizer loads without it under transformers 4.x (5.x reads config.json first and, on a terminal, asks about
the model's code: PreTrainedTokenizerFast.from_pretrained never asks). An export goes into a new or empty folder, or
with --force replaces an earlier export; a folder holding anything else, or the source, is refused. This file
writes files; it never imports transformers.

tokenizer.Tokenizer as a `tokenizers` pipeline:
  normalizer     runs of whitespace and "▁" -> one "▁", none at the ends, then "▁" prepended (not to "")
  pre-tokenizer  tokenizer.PAT with each Python class (\\d, [^\\W\\d_], ...) spelled out code point by code point,
                 because the Rust regex engine's Unicode classes differ (e.g. "²" is a letter to Python's
                 [^\\W\\d_]); then every pre-token cut into 64-character pieces (tokenizer.MAX_PRETOKEN)
  model          BPE with the same merges in the same order, byte fallback to "<0xXX>" (merges never
                 involve a byte token, so they never cross one, as in tokenizer.Tokenizer._encode_word)
  post-processor [CLS] $A [SEP] and [CLS] $A [SEP] $B [SEP]
  decoder        byte runs joined as UTF-8, "▁" -> " ", one leading space dropped; specials skipped
                 (skip_special_tokens=True)
"""
import argparse, functools, json, os, re, shutil, sys, tempfile, time
from dataclasses import asdict
from pathlib import Path

import torch

import tokenizer as tk
from lib.checkpoint import read_checkpoint
from lib.errors import UserError

HERE = Path(__file__).resolve().parent
MODELING, MODEL = "modeling_amlm.py", "model.py"  # the glue, and the maths it imports relatively
MAX_LENGTH = 512  # the pipeline fine-tunes on pairs of up to 512 tokens; RoPE runs at any length
PAT_TRANSLATED = r"▁?(?:[^\W\d_]+(?:['’][^\W\d_]+)*|\d+|(?:[^\w\s▁]|_)+)"  # the tokenizer.PAT spelled out below


class ExportError(UserError):
    """A user mistake (missing file, not our checkpoint, occupied output folder), said in one sentence."""


# -----------------------------------------------------------------------------
# reading the checkpoint: torch.load with weights_only, so a file never executes code

def load(path):
    """checkpoint.read_checkpoint with the tensors memory-mapped (a latest.pt also holds the optimizer state, which
    is never read) -> (checkpoint dict, config dict, Tokenizer), or a UserError in one sentence; the state_dict's keys and shapes
    are checked against model.py's.
    Example: load("out/run/latest.pt") -> ({"model": {...}, "step": 1000, ...}, {"vocab_size": 16384, ...}, Tokenizer)"""
    if Path(path).is_dir():
        raise ExportError(f"{path} is a folder; pass --milestones to export a run folder's checkpoints")
    ckpt, config, tokenizer = read_checkpoint(path, mmap=True)
    return ckpt, asdict(config), tokenizer


# -----------------------------------------------------------------------------
# the tokenizer as a `tokenizers` JSON file

@functools.lru_cache(None)
def every_code_point():
    """All of Unicode but the surrogates (which UTF-8 text cannot hold), in order, as one string."""
    return "".join(map(chr, [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]))


def char_class(pattern):
    """A regex class of every code point (surrogates aside) that matches pattern under Python's re, as
    \\x{..} ranges the Rust engine reads the same way. Example: char_class(r"\\d") -> "[\\x{30}-\\x{39}\\x{660}-...]"."""
    hits = [ord(ch) for ch in re.findall(pattern, every_code_point())]  # one C-level pass over all of Unicode
    ranges = []
    for c in hits:
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return "[" + "".join(f"\\x{{{a:X}}}" + (f"-\\x{{{b:X}}}" if b > a else "") for a, b in ranges) + "]"


@functools.lru_cache(None)
def hf_patterns():
    """(whitespace run, pre-token pattern) for the Rust regex engine, with classes spelled out from Python's.
    Example: -> ("[\\x{9}-\\x{D}\\x{1C}-\\x{20}...\\x{2581}]+", "\\x{2581}?(?:[\\x{41}-\\x{5A}\\x{61}-...]+(?:['\\x{2019}]...")"""
    if tk.PAT.pattern != PAT_TRANSLATED:
        raise ExportError("tokenizer.PAT has changed; update export.py's translation of it (and its tests)")
    space = char_class(r"\s")  # \s of str patterns is str.isspace, what str.split() splits on
    letter, digit, punct = char_class(r"[^\W\d_]"), char_class(r"\d"), char_class(r"[^\w\s▁]|_")
    mark = r"\x{2581}"  # ▁
    pretoken = rf"{mark}?(?:{letter}+(?:['\x{{2019}}]{letter}+)*|{digit}+|{punct}+)"
    return space[:-1] + mark + "]+", pretoken


def tokenizer_json(tok):
    """tokenizer.Tokenizer -> the dict of a tokenizer.json (see the module docstring for the pipeline).
    Example: a tokenizer with merges [(a, b)] -> {..., "model": {"type": "BPE", "vocab": {"[PAD]": 0, ...,
    "ab": 264}, "merges": [["a", "b"]], "byte_fallback": True, ...}}"""
    if len(set(tok.tokens)) != len(tok.tokens):
        # Hugging Face's vocabulary maps strings to ids, so two ids with one string cannot both exist there.
        # Our BPE merges id pairs and could in principle build one string twice (a merge (A, BC) needs BC to
        # form before AB, (AB, C) the reverse); docs/babylm-pipeline.md says how rare that is
        dup = next(t for i, t in enumerate(tok.tokens) if t in tok.tokens[:i])
        raise ExportError(f"the tokenizer has two tokens spelled {dup!r}, which a Hugging Face vocabulary cannot hold")
    space, pretoken = hf_patterns()
    regex = lambda p: {"Regex": p}
    specials = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True} for i, s in enumerate(tk.SPECIALS)]
    part = lambda kind, name, type_id: {kind: {"id": name, "type_id": type_id}}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": specials,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": regex(space), "content": "▁"},
            {"type": "Replace", "pattern": regex(r"\A\x{2581}|\x{2581}\z"), "content": ""},
            {"type": "Prepend", "prepend": "▁"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": regex(pretoken), "behavior": "Isolated", "invert": False},
            {"type": "Split", "pattern": regex(rf"[\s\S]{{1,{tk.MAX_PRETOKEN}}}"), "behavior": "Isolated", "invert": False}]},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [part("SpecialToken", "[CLS]", 0), part("Sequence", "A", 0), part("SpecialToken", "[SEP]", 0)],
            "pair": [part("SpecialToken", "[CLS]", 0), part("Sequence", "A", 0), part("SpecialToken", "[SEP]", 0),
                     part("Sequence", "B", 1), part("SpecialToken", "[SEP]", 1)],
            "special_tokens": {s: {"id": s, "ids": [i], "tokens": [s]} for s, i in (("[CLS]", tk.CLS), ("[SEP]", tk.SEP))}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "[UNK]", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tok.tokens)},
                  "merges": [[tok.tokens[a], tok.tokens[b]] for a, b in tok.merges]},
    }


def tokenizer_files(tok):
    """{file name: JSON text} of the fast tokenizer. tokenizer_class PreTrainedTokenizerFast loads in transformers
    4.51 and 5.x alike. A special token's name typed in the text ("[MASK]") is that special token, as Hugging Face MLM
    tokenizers do (tokenizer.Tokenizer keeps it plain text: the two agree id for id on text without those names)."""
    names = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "model_max_length": MAX_LENGTH,
              "model_input_names": ["input_ids", "attention_mask"], "padding_side": "right",
              "clean_up_tokenization_spaces": False}
    dump = lambda d: json.dumps(d, ensure_ascii=False, indent=1) + "\n"
    return {"tokenizer.json": json.dumps(tokenizer_json(tok), ensure_ascii=False), "tokenizer_config.json": dump(config),
            "special_tokens_map.json": dump(names)}


# -----------------------------------------------------------------------------
# the weights as safetensors, without the safetensors package

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}

def write_safetensors(tensors, path):
    """Write {name: tensor} as safetensors: 8-byte little-endian header length, JSON header of dtypes, shapes and
    byte ranges (padded with spaces to a multiple of 8), then the raw little-endian bytes back to back.
    Example: {"a": torch.zeros(2)} -> 8-byte length, '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8 zero bytes"""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)


# -----------------------------------------------------------------------------
# the folder

def config_json(cfg, ckpt):
    """config.json: the ModelConfig fields under their own names, plus what transformers needs to find the code.
    Example: -> {"architectures": ["AmlmForMaskedLM"], "model_type": "amlm", "auto_map": {"AutoModel":
    "modeling_amlm.AmlmModel", ...}, "vocab_size": 16384, "n_layer": 4, ..., "amlm_step": 2450}"""
    auto = {"AutoConfig": "AmlmConfig", "AutoModel": "AmlmModel", "AutoModelForMaskedLM": "AmlmForMaskedLM",
            "AutoModelForSequenceClassification": "AmlmForSequenceClassification"}
    return {"architectures": ["AmlmForMaskedLM"], "model_type": "amlm",
            "auto_map": {k: f"{Path(MODELING).stem}.{v}" for k, v in auto.items()},
            **cfg,
            "pad_token_id": tk.PAD, "cls_token_id": tk.CLS, "sep_token_id": tk.SEP, "mask_token_id": tk.MASK,
            "tie_word_embeddings": False, "torch_dtype": "float32",
            "tokenizer_class": "PreTrainedTokenizerFast",  # pipeline("fill-mask") loads a tokenizer only if named here
            "amlm_step": ckpt.get("step"), "amlm_words_seen": ckpt.get("words_seen")}


def write_folder(ckpt_path, folder):
    """Write the Hugging Face files of one checkpoint into folder (which must exist and be empty).
    Example: write_folder("out/run/ckpt_5M.pt", tmp / "chck_5M") -> config.json, model.safetensors, ... in it"""
    ckpt, cfg, tok = load(ckpt_path)
    files = tokenizer_files(tok)
    files["config.json"] = json.dumps(config_json(cfg, ckpt), indent=1) + "\n"
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    for src in (HERE / "lib" / MODELING, HERE / MODEL):
        shutil.copyfile(src, folder / src.name)
    # the keys of AmlmForMaskedLM: its AmlmModel "amlm" holds model.py's MaskedLM as "lm"
    write_safetensors({"amlm.lm." + k: v for k, v in ckpt["model"].items()}, folder / "model.safetensors")


def milestones(run_dir):
    """[(checkpoint, revision name)] of a run folder, in order of words seen: ckpt_<N>M.pt -> chck_<N>M (the
    pipeline's revision names), latest.pt -> main. Example: [ckpt_2M.pt, ckpt_10M.pt, latest.pt] ->
    [(ckpt_2M.pt, "chck_2M"), (ckpt_10M.pt, "chck_10M"), (latest.pt, "main")]"""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"run folder {run_dir} does not exist" if not run_dir.exists() else f"{run_dir} is not a folder")
    found = [(int(m[1]), p) for p in run_dir.iterdir() if (m := re.fullmatch(r"ckpt_(\d+)M\.pt", p.name))]
    pairs = [(p, f"chck_{n}M") for n, p in sorted(found)]
    if (run_dir / "latest.pt").is_file():
        pairs.append((run_dir / "latest.pt", "main"))
    if not pairs:
        raise ExportError(f"{run_dir} holds no ckpt_<N>M.pt or latest.pt")
    return pairs


OWN_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             MODELING, MODEL}


def foreign(folder, milestones_ok=True):
    """The first entry under folder that export.py would not have written, or None: an export holds only its own
    files, with a config.json of model_type "amlm", or (--milestones) only chck_<N>M/ and main/ folders that each
    are such an export. Example: hf/run holding chck_2M/ and main/ -> None; a run folder -> its latest.pt; a folder
    holding two exports hf/a/ and hf/b/ -> hf/a."""
    entries = sorted(folder.iterdir())
    if milestones_ok and entries and all(p.is_dir() and not p.is_symlink() and re.fullmatch(r"chck_\d+M|main", p.name)
                                         for p in entries):
        return next(filter(None, (foreign(p, milestones_ok=False) for p in entries)), None)
    for p in entries:
        if p.name not in OWN_FILES or not p.is_file() or p.is_symlink():
            return p
    try:
        ours = json.loads((folder / "config.json").read_text()).get("model_type") == "amlm"
    except (OSError, ValueError, AttributeError):
        ours = False
    return None if ours else folder / "config.json"


def check_out_dir(out_dir, source, force):
    """The output folder, resolved, or ExportError: a file, the source or a folder holding it, a folder holding
    anything export.py did not write (refused even with force), an earlier export without force.
    Example: check_out_dir("out/run", "out/run/latest.pt", True) -> ExportError("out/run holds the checkpoint ...")"""
    out, src = Path(out_dir).resolve(), Path(source).resolve()
    if out == out.parent:
        raise ExportError(f"cannot export into {out}; give a folder below it")
    if src == out:
        raise ExportError(f"{out_dir} is the {'run folder' if src.is_dir() else 'checkpoint'} being exported; "
                          f"export into another folder")
    if out in src.parents:
        raise ExportError(f"{out_dir} holds the {'run folder' if src.is_dir() else 'checkpoint'} being exported "
                          f"({source}); export into another folder")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out_dir} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if (extra := foreign(out)) is not None:
            raise ExportError(f"{out_dir} holds files export.py did not write ({extra.relative_to(out)}); "
                              f"export into a new or empty folder")
        if not force:
            raise ExportError(f"{out_dir} holds an earlier export; pass --force to replace it")
    return out


def export(source, out_dir, force=False, all_milestones=False, quiet=False):
    """Export a checkpoint (or, with all_milestones, a run folder) into out_dir: a new folder, an empty one, or with
    force an earlier export (a folder holding anything else is never touched). Everything is written into a
    temporary folder beside it and moved into place at the end, so a failure leaves no half-written export.
    Example: export("out/run", "hf/run", all_milestones=True) -> ["hf/run/chck_1M", ..., "hf/run/main"]"""
    jobs = milestones(source) if all_milestones else [(Path(source), None)]
    out = check_out_dir(out_dir, source, force)
    made = [next((p for p in reversed(out.parents) if not p.exists()), None)]  # folders made for out, removed on failure
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp", dir=out.parent))  # a new name: never a folder of the user's
        made.append(tmp)
        for ckpt, name in jobs:
            t0, folder = time.time(), tmp / name if name else tmp
            folder.mkdir(exist_ok=True)
            write_folder(ckpt, folder)
            if not quiet:
                print(f"{ckpt} -> {Path(out_dir) / name if name else out_dir} ({time.time() - t0:.1f} s)", file=sys.stderr)
        made[0] = None  # out's parents stay now
        if not out.exists():
            os.replace(tmp, out)
        else:  # the entries move, not the folder, so the folder stays the same one (a shell's current folder, say)
            old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old", dir=out.parent))
            moved = []  # (from, to) of every entry moved: a failed move undoes them all, the earlier export stays whole
            try:
                for a, b in [(out, old), (tmp, out)]:  # out: an earlier export, foreign() found nothing else in it
                    for p in list(a.iterdir()):
                        os.replace(p, b / p.name)
                        moved.append((p, b / p.name))
            except OSError:
                for src, dst in reversed(moved):
                    os.replace(dst, src)
                old.rmdir()
                raise
            shutil.rmtree(old)  # only now, with the new export in place
    except OSError as e:
        raise ExportError(f"cannot write {out_dir} ({e.strerror or e})") from None
    finally:
        for p in made:
            if p is not None:
                shutil.rmtree(p, ignore_errors=True)
    return [Path(out_dir) / name if name else Path(out_dir) for _, name in jobs]


# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    ap = argparse.ArgumentParser(description="Export an amlm checkpoint in Hugging Face format (for the BabyLM pipeline).")
    ap.add_argument("source", help="a train.py checkpoint (.pt), or with --milestones a run folder")
    ap.add_argument("out_dir", help="the folder to write: a new or empty one, or with --force an earlier export")
    ap.add_argument("--milestones", action="store_true", help="export every ckpt_<N>M.pt as chck_<N>M/ and latest.pt as main/")
    ap.add_argument("--force", action="store_true", help="replace an earlier export in out_dir (a folder holding "
                    "anything else is refused)")
    args = ap.parse_args(argv)
    try:
        export(args.source, args.out_dir, args.force, args.milestones)
    except UserError as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
