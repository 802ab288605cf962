"""
What amlm's commands (train.py, evaluate.py, export.py) lean on; none of it is the method itself.

    fast.py           the same model faster: hand-written pieces over model.py's MaskedLM (train/evaluate --fast)
    checkpoint.py     reading and writing checkpoints: atomic, weights_only, exact resume
    run.py            setting a run up: device and precision, the run folder and its lock, Ctrl-C, the exit
    ddp.py            torchrun: the process group, DDP, the global loss
    progress.py       what a run tells its user: the bar, log.txt, amlm.csv, summary.json
    estimate.py       how long a run will take, said before its first step
    optim.py          AdamW, or LAMB as in the paper's code
    compare.py        evaluate.py's statistics: Spearman, rho_ctrl, the paired bootstrap, --compare (WUG and GLUE)
    errors.py         the one-sentence error classes the commands print as "error: ..."
    modeling_amlm.py  the Hugging Face glue that export.py copies into an export folder

Nothing here imports a command. Part of a PyTorch reimplementation of Edman & Fraser, "Mask and You Shall Receive:
Optimizing Masked Language Modeling for Pretraining BabyLMs" (BabyLM 2025).
"""
