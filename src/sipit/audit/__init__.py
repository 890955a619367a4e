"""Audit: check the paper's first claim (no two prompts share a hidden state) on a model and data.

    pairs.py          the pairwise test: last-token states of every prompt at every layer, all
                      pairwise L2 distances (`audit_pairs`), paper-scale prompt sets
    scan.py           the blocked all-pairs scan behind it: GEMM screening, exact minima,
                      collision counts, histogram, resumable state
    continuations.py  the exhaustive test: a prefix extended by every vocabulary token
    margins.py        per-position margins against fp32 / fp16 / bf16 resolution
    minilm.py         the same audit on a real pretrained encoder (optional `minilm` extra)
    report.py         JSON, markdown summary and plots
    collect.py        states at several layers from one forward pass; equal-length batches

Layer names follow `sipit.lm`. Every audit takes a `progress(done, total, label)` callback.
"""
