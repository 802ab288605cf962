"""
The errors a user can cause, each said in one sentence: the commands catch UserError and print "error: <sentence>"
with a non-zero exit, never a traceback. Part of a PyTorch reimplementation of Edman & Fraser, "Mask and You Shall
Receive: Optimizing Masked Language Modeling for Pretraining BabyLMs" (BabyLM 2025).

    try: ckpt, config, tok = read_checkpoint(path)
    except UserError as e: sys.exit(f"error: {e}")
"""
import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (exit 2) instead of the usage block; a subcommand's parser is one too.
    Example: data.py --vocab-size q -> "data.py: error: argument --vocab-size: invalid int value: 'q' (see --help)" """
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class UserError(Exception):
    """A user mistake or an unusable file, said in one sentence. Example: UserError("x.pt does not exist")."""

class DataError(UserError):
    """A corpus, tokenizer or task file that cannot be used (bad path, bad size, corrupt or malformed file)."""

class CheckpointError(UserError):
    """A file that is not a checkpoint of this version, or one that cannot be written."""

class EvalError(UserError):
    """An evaluation input that cannot be used: a bad path, a malformed line, a bad flag, files that do not compare."""
