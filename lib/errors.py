"""
The errors a user can cause, each said in one sentence: the commands catch UserError and print "error: <sentence>"
with a non-zero exit, never a traceback. Part of a PyTorch reimplementation of Edman & Fraser, "Mask and You Shall
Receive: Optimizing Masked Language Modeling for Pretraining BabyLMs" (BabyLM 2025).

    try: ckpt, config, tok = read_checkpoint(path)
    except UserError as e: sys.exit(f"error: {e}")
"""


class UserError(Exception):
    """A user mistake or an unusable file, said in one sentence. Example: UserError("x.pt does not exist")."""

class DataError(UserError):
    """A corpus, tokenizer or task file that cannot be used (bad path, bad size, corrupt or malformed file)."""

class CheckpointError(UserError):
    """A file that is not a checkpoint of this version, or one that cannot be written."""

class EvalError(UserError):
    """An evaluation input that cannot be used: a bad path, a malformed line, a bad flag, files that do not compare."""
