"""An RL loop that shows the sampler/trainer mismatch: Dr. GRPO on a verifiable task, per dtype.

Setup (all on CPU, one thread):
    policy     a tiny Llama (sipit.models.archs) trained from scratch by supervised fine-tuning
               (SFT) on the task until it solves a fraction of it (`start`);
    prompts    the "perfectible" set: prompts the starting policy solves 20-80% of the time;
    sampler    a copy of the policy held in the run dtype (fp32, bf16 or fp16), decoding with a
               KV cache; its log-probs are mu;
    trainer    the fp32 master weights run under autocast in the run dtype, one teacher-forced
               batch forward; its log-probs are pi. fp16 runs use dynamic loss scaling.
    objective  Dr. GRPO: advantage = reward - group mean, token losses summed and divided by a
               constant; no KL penalty. Variants weight each token's -A * log pi by
               plain: 1;  tis: min(pi / mu, cap) per token;  mis: the sequence ratio
               prod(pi / mu), or 0 where it exceeds its cap.

Why not TRL: its GRPOTrainer runs through Accelerate, which refuses fp16 mixed precision on a
CPU, and its sampler-side importance correction needs vLLM; this loop is small and owns both.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sipit import lm as lm_mod
from sipit import states as states_mod
from sipit.errors import SipitError
from sipit.models import archs
from sipit.precision import engines, tasks
from sipit.precision.mismatch import compare

log = logging.getLogger(__name__)

VARIANTS = ("plain", "tis", "mis")
# The tiny policy: 2 blocks of width 64 over the task's 16-token vocabulary (109K parameters).
POLICY_SIZES = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)


@dataclass
class RLConfig:
    """One RL run; the start (SFT policy + perfectible prompts) is shared by runs in `out`."""

    dtype: str = "bf16"  # sampler dtype and trainer autocast dtype
    variant: str = "plain"  # plain, tis (token-level truncated IS) or mis (sequence-level masked)
    steps: int = 150
    prompts_per_step: int = 8
    group: int = 8  # samples per prompt
    lr: float = 1e-4
    clip: float = 1.0  # gradient-norm clip, applied after unscaling
    tis_cap: float = 2.0
    mis_cap: float = 10.0
    init_scale: float = 2.0**16  # fp16 loss scale at start
    growth_interval: int = 400  # steps without overflow before the loss scale doubles
    temperature: float = 1.0
    eval_every: int = 25  # steps between evaluations on the whole perfectible set
    eval_samples: int = 8  # samples per prompt in an evaluation
    seed: int = 0
    out: str = "runs/precision-rl"
    start: StartConfig = field(default_factory=lambda: StartConfig())


@dataclass
class StartConfig:
    """How the starting policy and the perfectible prompt set are made."""

    length: int = 14  # digits to sort
    sft_lr: float = 3e-3
    sft_batch: int = 64
    sft_max_steps: int = 3000
    sft_target: float = 0.4  # stop SFT once sampled accuracy reaches this
    candidates: int = 256  # prompts tried for the perfectible set
    samples: int = 16  # samples per candidate prompt (the paper uses 40)
    band: tuple[float, float] = (0.2, 0.8)
    seed: int = 0


def build_policy(seed: int) -> lm_mod.LM:
    """A fresh tiny Llama over the task vocabulary, wrapped as an LM."""
    torch.manual_seed(seed)
    model = archs.build("llama", tasks.VOCAB_SIZE, **POLICY_SIZES)
    return lm_mod.wrap(model, None, "precision-rl-policy")


def perfectible(solve_rates: torch.Tensor, band: tuple[float, float] = (0.2, 0.8)) -> torch.Tensor:
    """Which prompts are 'perfectible': solve rate within [low, high]. (n,) -> (n,) bool."""
    low, high = band
    return (solve_rates >= low) & (solve_rates <= high)


@torch.no_grad()
def solve_rates(lm: lm_mod.LM, task: tasks.SortTask, prompts: torch.Tensor, samples: int,
                generator: torch.Generator, temperature: float = 1.0) -> torch.Tensor:
    """Fraction of `samples` sampled answers that are correct, per prompt: (n, P) -> (n,)."""
    rates = []
    for chunk in prompts.split(max(1, 512 // samples)):
        repeated = chunk.repeat_interleave(samples, dim=0)
        responses, _ = engines.sample(lm, repeated, task.answer_len, generator, temperature)
        rates.append(task.reward(repeated, responses).view(len(chunk), samples).mean(1))
    return torch.cat(rates)


def sft(lm: lm_mod.LM, task: tasks.SortTask, cfg: StartConfig) -> dict:
    """Supervised fine-tuning on the task until the sampled accuracy reaches cfg.sft_target."""
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(lm.model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    probe = task.prompts(128, generator)
    accuracy, step = 0.0, 0
    for step in range(1, cfg.sft_max_steps + 1):
        lm.model.train()
        prompts = task.prompts(cfg.sft_batch, generator)
        ids = torch.cat([prompts, task.answers(prompts)], dim=1)  # (B, P + A)
        labels = ids.clone()
        labels[:, : task.prompt_len] = -100  # loss on the answer only
        loss = lm.model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            lm.model.eval()
            accuracy = float(solve_rates(lm, task, probe, 1, generator).mean())
            log.info("sft step %d: loss %.3f, sampled accuracy %.2f", step, float(loss), accuracy)
            if accuracy >= cfg.sft_target:
                break
    lm.model.eval()
    return dict(steps=step, accuracy=accuracy)


def prepare_start(cfg: StartConfig, path: Path) -> tuple[lm_mod.LM, torch.Tensor, dict]:
    """The starting policy and perfectible prompts, made once and kept at `path`."""
    task = tasks.SortTask(cfg.length)
    lm = build_policy(cfg.seed)
    if path.is_file():
        tensors, saved = states_mod.load_bundle(path)
        if saved["config"] == json.loads(json.dumps(asdict(cfg))):
            prompts = tensors.pop("prompts")
            lm.model.load_state_dict(tensors)
            lm.model.eval()
            return lm, prompts, saved["record"]
        log.info("start at %s was made with other settings: remaking it", path)

    started = time.perf_counter()
    record = dict(sft=sft(lm, task, cfg))
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    candidates = task.prompts(cfg.candidates, generator)
    rates = solve_rates(lm, task, candidates, cfg.samples, generator)
    keep = perfectible(rates, cfg.band)
    if keep.sum() < 8:
        raise SipitError(f"only {int(keep.sum())} perfectible prompts: train the start longer")
    record.update(candidates=cfg.candidates, kept=int(keep.sum()),
                  kept_mean_rate=float(rates[keep].mean()), seconds=time.perf_counter() - started)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = dict(lm.model.state_dict(), prompts=candidates[keep])
    states_mod.save_bundle(path, tensors, dict(config=asdict(cfg), record=record))
    log.info("start: %s", record)
    return lm, candidates[keep], record


def scaled_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer,
                loss: torch.Tensor, clip: float) -> tuple[float, bool]:
    """Backward with loss scaling, unscale, clip, step; a non-finite gradient skips the step.

    Returns (gradient norm before clipping, whether the step was skipped). With a disabled
    scaler (fp32, bf16) the scale is 1 and non-finite steps are skipped here instead.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    if not scaler.is_enabled():
        skipped = not math.isfinite(norm)
        if not skipped:
            optimizer.step()
        return norm, skipped
    before = scaler.get_scale()
    scaler.step(optimizer)  # skipped internally when the unscaled gradient is not finite
    scaler.update()
    return norm, scaler.get_scale() < before


def token_weights(variant: str, log_pi: torch.Tensor, log_mu: torch.Tensor, mask: torch.Tensor,
                  cfg: RLConfig) -> torch.Tensor:
    """Importance weights (detached) of each response token: (B, R) -> (B, R)."""
    log_ratio = (log_pi - log_mu).detach() * mask
    if variant == "plain":
        return torch.ones_like(log_ratio)
    if variant == "tis":
        return log_ratio.exp().clamp(max=cfg.tis_cap)
    seq = log_ratio.sum(1, keepdim=True).exp()  # (B, 1) sequence ratio
    return torch.where(seq <= cfg.mis_cap, seq, torch.zeros_like(seq)).expand_as(log_ratio)


class Run:
    """The state of one RL run: master policy, sampler copy, optimizer and loss scaler."""

    def __init__(self, cfg: RLConfig, start: lm_mod.LM, prompts: torch.Tensor):
        if cfg.variant not in VARIANTS:
            raise SipitError(f"unknown variant {cfg.variant!r}: use one of {', '.join(VARIANTS)}")
        self.cfg, self.prompts = cfg, prompts
        self.task = tasks.SortTask(prompts.shape[1] - 1)
        self.dtype = lm_mod.resolve_dtype(cfg.dtype)
        self.master = start  # fp32 master weights, the trainer
        self.master.model.train()
        sampler = copy.deepcopy(start.model).to(self.dtype).eval()
        self.sampler = lm_mod.wrap(sampler, None, "precision-rl-sampler")
        self.optimizer = torch.optim.AdamW(start.model.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.scaler = torch.amp.GradScaler(
            "cpu", init_scale=cfg.init_scale, growth_interval=cfg.growth_interval,
            enabled=self.dtype == torch.float16)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the master weights into the sampler, rounding them to its dtype."""
        for target, source in zip(self.sampler.model.parameters(), self.master.model.parameters(),
                                  strict=True):
            target.copy_(source)

    def evaluate(self) -> float:
        """Mean solve rate of the sampler over the whole perfectible set."""
        return float(solve_rates(self.sampler, self.task, self.prompts, self.cfg.eval_samples,
                                 self.generator, self.cfg.temperature).mean())

    def step(self) -> dict:
        """Sample a group per prompt, score it, and take one Dr. GRPO step."""
        cfg, started = self.cfg, time.perf_counter()
        self.sync()
        pick = torch.randperm(len(self.prompts), generator=self.generator)[: cfg.prompts_per_step]
        prompts = self.prompts[pick].repeat_interleave(cfg.group, dim=0)  # (B, P), B = n * G
        responses, full_mu = engines.sample(self.sampler, prompts, self.task.answer_len,
                                            self.generator, cfg.temperature)  # (B, R), (B, R, V)
        mask = tasks.response_mask(responses)
        reward = self.task.reward(prompts, responses)  # (B,)
        advantage = reward - reward.view(-1, cfg.group).mean(1).repeat_interleave(cfg.group)

        full_pi = engines.teacher_forced(self.master, prompts, responses, mask, tasks.PAD,
                                         cfg.temperature, self.dtype)  # (B, R, V)
        log_pi = full_pi.gather(-1, responses[..., None])[..., 0]  # (B, R)
        log_mu = full_mu.gather(-1, responses[..., None])[..., 0]
        weights = token_weights(cfg.variant, log_pi, log_mu, mask, cfg)
        # Dr. GRPO: sum over tokens, divide by a constant (batch x longest answer).
        loss = -(weights * advantage[:, None] * log_pi * mask).sum() / mask.numel()
        norm, skipped = scaled_step(self.scaler, self.optimizer, loss, cfg.clip)

        metrics = compare(full_mu, full_pi.detach(), responses, mask, cfg.tis_cap)
        return dict(
            reward=float(reward.mean()), kl=metrics["kl"], k3=metrics["k3"],
            dp_abs_mean=metrics["dp_abs_mean"], dp_max=metrics["dp_max"],
            dp_min=metrics["dp_min"], seq_log_ratio_abs=float(
                torch.tensor(metrics["seq_log_ratios"]).abs().mean()),
            masked=float((weights[:, 0] == 0).float().mean()) if cfg.variant == "mis" else 0.0,
            grad_norm=norm, loss_scale=float(self.scaler.get_scale()), skipped=skipped,
            seconds=time.perf_counter() - started)


def train(cfg: RLConfig, progress=None) -> dict:
    """Run Dr. GRPO for cfg.steps; the history is written to OUT/rl_<dtype>_<variant>.json."""
    out = Path(cfg.out)
    start, prompts, start_record = prepare_start(cfg.start, out / "start.safetensors")
    torch.manual_seed(cfg.seed)
    run = Run(cfg, start, prompts)
    run.sync()
    history, evals = [], [dict(step=0, solve_rate=run.evaluate())]
    for step in range(1, cfg.steps + 1):
        row = run.step()
        row["step"] = step
        history.append(row)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            run.sync()
            evals.append(dict(step=step, solve_rate=run.evaluate()))
        if step % 10 == 0:
            log.info("step %d: reward %.2f, kl %.2e, |pi-mu| %.2e, scale %.0f", step,
                     row["reward"], row["kl"], row["dp_abs_mean"], row["loss_scale"])
        if progress is not None:
            progress(step, cfg.steps)
    result = dict(config=asdict(cfg), start=start_record, prompts=len(prompts), evals=evals,
                  history=history, skipped=sum(r["skipped"] for r in history),
                  seconds=sum(r["seconds"] for r in history))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rl_{cfg.dtype}_{cfg.variant}.json").write_text(json.dumps(result, indent=1))
    return result
