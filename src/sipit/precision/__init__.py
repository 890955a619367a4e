"""Precision: the sampler/trainer mismatch of RL fine-tuning in fp32, bf16 and fp16.

    mismatch.py  the mismatch meter: KV-cached sampler vs teacher-forced trainer, same weights
    engines.py   the two computations (sampler, trainer) shared by the meter and the RL loop
    rl.py        Dr. GRPO on a verifiable task with plain / token-TIS / sequence-MIS variants,
                 fp32 master weights and dynamic loss scaling for fp16
    tasks.py     the verifiable task (sorting digits) and its reward
    plots.py     figures for docs/

Inversion under precision (capture in one dtype, invert in another) uses sipit.capture and
sipit.invert directly; see benchmarks/precision_invert.py.
"""
