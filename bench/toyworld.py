"""The toy-world study (issue 7): the paper's claims reproduced on a small synthetic world.

    python bench/toyworld.py                      # full study, writes bench/toyworld_run/report/REPORT.md
    python bench/toyworld.py --scale smoke --out /tmp/toy   # every step for a few iterations (minutes on a CPU)
    python bench/toyworld.py --seed 1 --out DIR --extend_reward 250   # then w = 1, 0.3, auto continued to 250 steps

Rerun the same command after an interruption: finished steps are skipped and a cut-off stage
resumes from its last checkpoint (results so far are in report/results.json).

Steps (each through the project's own code where the project has it):
1. `longalign.toyworld.make`: data + model folders; the toy CLIP and VAE are trained.
2. The toy "SD1.5": a full UNet trained from scratch with plain 77-token conditioning
   (`toyworld_models.train_base_unet`), written into `sd15/unet`.
3. Claim 1 (paper §3): the base vs the base after the project's `align` stage
   (`run_unet.sh align`, segment-level CLIP encoding, `--encoder_mode clip`) — oracle accuracy of
   facts stated before / across / after token 77, over two sampling seeds.
4. Claim 2 (paper §4): `run_unet.sh reward` with the toy CLIP as preference model at w = 1, 0.3, 0
   and `auto` (w = 0.4 sqrt(1 - eta^2) / eta per batch, METHOD.md §4; same steps and seeds); oracle accuracy, hallucination, plain reward and its text-relevant /
   text-irrelevant parts on held-out captions, and eta, |t_perp| and the scores over training steps.
5. The preference analysis (`python -m longalign.analyze_preference`) on held-out image/caption pairs.
6. With `--extend_reward STEPS`: the w = 1, 0.3 and auto reward runs continued to STEPS optimizer
   steps (does a w < 1 only delay the reward hacking that w = 1 shows?), evaluated like step 4.

The captions have no decimals or abbreviations, so the `legacy` segmenter (split at `.`) gives the
same segments as pySBD (checked here) at a fraction of the cost; the stages run with it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from longalign import toyworld as tw  # noqa: E402
from longalign import toyworld_models as tm  # noqa: E402

WEIGHTS = ("1", "0.3", "0", "auto")
# the plain reward, the paper's setting and the eta-matched weight: which of them only hack later?
EXTEND_WEIGHTS = ("1", "0.3", "auto")


@dataclass
class Scale:
    """Sizes of one study run."""

    n: int
    n_eval: int
    clip_steps: int
    vae_steps: int
    base_steps: int
    align_steps: int
    reward_steps: int
    sample_seeds: tuple[int, ...]
    batch: int = 64
    reward_batch: int = 16
    rollout_steps: int = 50  # reward stage: DDIM steps of the rollout (paper: 50, gradient at 5 of them)


SCALES = {
    "full": Scale(4096, 256, 1500, 1500, 3000, 1500, 100, (0, 1)),
    "smoke": Scale(96, 16, 5, 5, 5, 2, 2, (0,), batch=8, reward_batch=2, rollout_steps=10),
}


def same_scale(saved: dict | None, scale: Scale) -> bool:
    """Whether a results.json's `scale` is `scale`; a field added to `Scale` since counts as its default."""
    try:
        return json.loads(json.dumps(Scale(**saved).__dict__)) == json.loads(json.dumps(scale.__dict__))
    except TypeError:  # None, or a field this version does not know
        return False


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(args: list[str], cwd: Path) -> None:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    # NUM_GPUS=1: the study's batch sizes are per process, so one process keeps its numbers the same
    # on any machine (and run_unet.sh skips counting GPUs)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable, "PYTHONPATH": path, "NUM_GPUS": "1"}
    env.pop("ACCELERATE_CONFIG", None)  # run_unet.sh would launch by that file instead
    start = time.time()
    result = subprocess.run(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args[:4])} failed ({result.returncode}):\n{result.stdout[-6000:]}")
    log(f"{' '.join(args[1:3])} done in {time.time() - start:.0f}s")


def grid(images: torch.Tensor, path: Path, cols: int = 8) -> None:
    """Save images (N, 3, 32, 32) as one PNG grid, upscaled x3 with nearest neighbours."""
    import torch.nn.functional as F

    n = len(images)
    rows = (n + cols - 1) // cols
    canvas = torch.ones(3, rows * 34, cols * 34) * 0.5
    for k, image in enumerate(images):
        r, c = divmod(k, cols)
        canvas[:, r * 34 + 1 : r * 34 + 33, c * 34 + 1 : c * 34 + 33] = image
    tw.to_pil(F.interpolate(canvas[None], scale_factor=3, mode="nearest")[0]).save(path)


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for event_file in folder.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return {tag: sorted(dict(values).items()) for tag, values in out.items()}  # one value per step (a resumed run rewrites some)


class Study:
    def __init__(self, out: Path, scale: Scale, device: str, seed: int, extend_reward: int | None = None):
        out = out.resolve()  # the stages run with `out` as their working directory
        self.out, self.scale, self.device, self.seed = out, scale, device, seed
        if extend_reward is not None and extend_reward <= scale.reward_steps:
            raise SystemExit(f"--extend_reward {extend_reward}: must exceed the study's {scale.reward_steps} reward steps")
        self.extend_steps = extend_reward
        self.world = out / "world"
        self.report = out / "report"
        self.report.mkdir(parents=True, exist_ok=True)
        self.results: dict = {"scale": scale.__dict__, "device": device, "seed": seed, "timings_s": {}}
        saved = self.report / "results.json"
        if saved.exists():  # resume a cut-off run: finished steps are skipped
            previous = json.loads(saved.read_text())
            if not same_scale(previous.get("scale"), scale) or previous.get("seed") != seed:
                raise SystemExit(f"{saved} is from another scale or seed; pick another --out to start a new study")
            self.results = {**previous, "device": device}
            log(f"resuming {out}: done {', '.join(self.results['timings_s']) or 'nothing'}")

    def done(self, name: str) -> bool:
        """Whether step `name` finished in an earlier (cut-off) run of this study."""
        return name in self.results["timings_s"]

    def timed(self, name: str, start: float) -> None:
        """Record a step's wall time and save the results so far (a cut-off run keeps them)."""
        self.results["timings_s"][name] = round(time.time() - start, 1)
        self.save()

    def save(self) -> None:
        (self.report / "results.json").write_text(json.dumps(self.results, indent=2))

    # -------------------------------------------------------------------------- 1. the world
    def make(self) -> None:
        start = time.time()
        s = self.scale
        if not self.done("make"):
            config = tw.MakeConfig(n=s.n, n_eval=s.n_eval, seed=self.seed, clip_steps=s.clip_steps, vae_steps=s.vae_steps, device=self.device)
            tw.make(self.world, config, log=log)
        self.tokenizer = tw.build_tokenizer()
        self.train_scenes = tw.read_scenes(self.world / "data" / "train_scenes.jsonl")
        self.eval_scenes = tw.read_scenes(self.world / "data" / "eval_scenes.jsonl")
        if self.done("make"):
            return
        from longalign.text_encoding import split_legacy, split_sentences

        same = all(split_legacy(c.caption) == split_sentences(c.caption, self.tokenizer) for c in self.eval_scenes[:64])
        self.results["legacy_segmenter_equals_sentences"] = same
        positions = [w for scene in self.eval_scenes for _, _, w in tw.sentence_positions(scene, self.tokenizer)]
        self.results["eval_objects_by_position"] = {p: positions.count(p) for p in tw.POSITIONS}
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(self.world / "sd15", subfolder="vae").to(self.device).eval()
        truth = torch.stack([tw.render(s) for s in self.eval_scenes])
        recon = tm.decode_latents(vae, tm.encode_latents(vae, truth))
        self.results["vae_reconstruction"] = {
            "mse": float(((recon - truth) ** 2).mean()),
            "oracle": tw.score_images(recon, self.eval_scenes, self.tokenizer),
        }
        log(f"VAE reconstruction: {self.results['vae_reconstruction']['oracle']['all']}")
        self.timed("make", start)

    # -------------------------------------------------------------------------- 2. the base
    def train_base(self) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        if self.done("base_training"):
            return
        start = time.time()
        sd15 = self.world / "sd15"
        vae = AutoencoderKL.from_pretrained(sd15, subfolder="vae").to(self.device).eval()
        text_encoder = CLIPTextModel.from_pretrained(sd15, subfolder="text_encoder").to(self.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(sd15, subfolder="tokenizer")
        plain = tm.PlainPromptEncoder(tokenizer, text_encoder)
        images = torch.stack([tw.render(s) for s in self.train_scenes])
        latents = tm.encode_latents(vae, images)
        contexts = tm.encode_in_batches(plain, [s.caption for s in self.train_scenes])
        uncond = plain([""])
        unet = UNet2DConditionModel.from_pretrained(sd15, subfolder="unet").to(self.device)
        scheduler = DDPMScheduler.from_pretrained(sd15, subfolder="scheduler")
        config = tm.BaseTrainingConfig(steps=self.scale.base_steps, batch_size=self.scale.batch, seed=self.seed)
        tm.train_base_unet(unet, latents, contexts, uncond, scheduler, config, log=log)
        unet.cpu().save_pretrained(sd15 / "unet")
        self.timed("base_training", start)

    # -------------------------------------------------------------------------- evaluation
    def load_eval_parts(self, init_from: list[Path], long: bool):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        from longalign.lora import fuse_stage_loras
        from longalign.text_encoding import LongPromptEncoder

        sd15 = self.world / "sd15"
        unet = UNet2DConditionModel.from_pretrained(sd15, subfolder="unet")
        fuse_stage_loras(unet, [str(p) for p in init_from])
        unet.to(self.device).eval()
        vae = AutoencoderKL.from_pretrained(sd15, subfolder="vae").to(self.device).eval()
        scheduler = DDPMScheduler.from_pretrained(sd15, subfolder="scheduler")
        if long:
            encoder = LongPromptEncoder.from_pretrained(str(sd15), mode="clip", segmenter="legacy", device=self.device)
            encode = lambda prompts: encoder(prompts)[0]  # noqa: E731
        else:
            from transformers import AutoTokenizer, CLIPTextModel

            text_encoder = CLIPTextModel.from_pretrained(sd15, subfolder="text_encoder").to(self.device).eval()
            encode = tm.PlainPromptEncoder(AutoTokenizer.from_pretrained(sd15, subfolder="tokenizer"), text_encoder)
        return unet, vae, scheduler, encode

    @torch.no_grad()
    def evaluate(self, name: str, init_from: list[Path], long: bool) -> dict:
        start = time.time()
        unet, vae, scheduler, encode = self.load_eval_parts(init_from, long)
        captions = [s.caption for s in self.eval_scenes]
        contexts = tm.encode_in_batches(encode, captions)
        uncond = encode([""])
        per_seed = {}
        for seed in self.scale.sample_seeds:
            images = tm.generate(unet, vae, scheduler, contexts, uncond, seed=1000 * seed)
            per_seed[seed] = tw.score_images(images, self.eval_scenes, self.tokenizer)
            per_seed[seed]["preference"] = self.preference_scores(images)
            if seed == self.scale.sample_seeds[0] and name != "aligned_truncated":
                grid(images[:16], self.report / f"{name}.png")
        self.timed(f"eval_{name}", start)
        log(f"{name}: " + ", ".join(f"seed {s}: after-77 colour {r['after']['colour']:.3f}" for s, r in per_seed.items()))
        return per_seed

    @torch.no_grad()
    def preference_scores(self, images: torch.Tensor) -> dict:
        """Plain reward x.t and its parts on held-out captions (V = the eval set's common direction)."""
        from longalign.reward import common_direction, decompose, load_preference_model

        if not hasattr(self, "preference"):
            self.preference = load_preference_model(str(self.world / "preference"), segmenter="legacy")
            self.eval_text = self.preference.embed_texts([s.caption for s in self.eval_scenes], "segment")
            self.eval_parts = decompose(self.eval_text, common_direction(self.eval_text))
        x = self.preference.embed_images(images, random_crop=False)
        return {
            "score": (x * self.eval_text).sum(-1).mean().item(),
            "text_relevant": (x * self.eval_parts.text_relevant).sum(-1).mean().item(),
            "text_irrelevant": (x * self.eval_parts.text_irrelevant).sum(-1).mean().item(),
        }

    # -------------------------------------------------------------------------- 3. stages
    def stage_flags(self, steps: int, batch: int) -> list[str]:
        return [
            "--pretrained_model", str(self.world / "sd15"), "--t5_model", str(self.world / "t5"),
            "--dataset", str(self.world / "data" / "train.jsonl"), "--resolution", "32",
            "--encoder_mode", "clip", "--segmenter", "legacy", "--train_batch_size", str(batch),
            "--gradient_accumulation_steps", "1", "--max_train_steps", str(steps), "--mixed_precision", "no",
            "--dataloader_num_workers", "2", "--checkpointing_steps", str(max(steps // 5, 1)), "--validation_steps", "0",
            "--validation_prompts", self.eval_scenes[0].caption, "--seed", str(self.seed),
        ]  # fmt: skip

    def stage(self, stage: str, name: str, flags: list[str]) -> Path:
        """`run_unet.sh STAGE NAME FLAGS`; a cut-off run resumes from its last checkpoint, a finished
        one (with `final/`) is not run again. Returns the run folder."""
        folder = self.out / "runs" / f"{stage}-{name}"
        if not (folder / "final" / "config.json").exists():
            start = time.time()
            run(["bash", str(ROOT / "run_unet.sh"), stage, name, *flags, "--resume_from", "auto"], self.out)
            self.timed(f"{stage}_stage_{name}", start)
        return folder

    def align(self) -> Path:
        flags = self.stage_flags(self.scale.align_steps, self.scale.batch)
        flags += ["--learning_rate", "5e-4", "--lr_warmup_steps", "50", "--lora_dropout", "0.0", "--report_to", "none"]
        return self.stage("align", "toy", flags) / "final"

    def reward_flags(self, weight: str, steps: int, align_final: Path) -> list[str]:
        flags = self.stage_flags(steps, self.scale.reward_batch)
        flags += ["--init_from", str(align_final), "--reward_model", str(self.world / "preference"),
                  "--text_irrelevant_weight", weight, "--guidance_scale", "3.0", "--learning_rate", "3e-4",
                  "--lr_warmup_steps", "10", "--lora_dropout", "0.0", "--report_to", "tensorboard",
                  # gradient at 5 steps spread evenly over the rollout, as released (50 steps: stride 10)
                  "--rollout_steps", str(self.scale.rollout_steps), "--grad_steps", "5",
                  "--grad_stride", str(self.scale.rollout_steps // 5)]  # fmt: skip
        return flags

    def reward(self, weight: str, align_final: Path) -> Path:
        return self.stage("reward", f"toy-w{weight}", self.reward_flags(weight, self.scale.reward_steps, align_final))

    def extend_reward(self, weight: str, align_final: Path) -> Path:
        """The `weight` reward run continued to `self.extend_steps` steps, in a new run folder.

        The folder starts from a copy of the original run's last checkpoint and logs, so no step is
        trained twice. The learning rate is constant after warm-up and the data order resumes from
        the checkpoint, so this is the run that `extend_steps` steps from the start would give.
        """
        from longalign.training import checkpoint_dirs

        name = f"toy-w{weight}-to{self.extend_steps}"
        target = self.out / "runs" / f"reward-{name}"
        if not checkpoint_dirs(str(target)) and not (target / "final").exists():
            source = self.out / "runs" / f"reward-toy-w{weight}"
            found = checkpoint_dirs(str(source))
            if not found:
                raise SystemExit(f"{source} has no checkpoint to continue from")
            shutil.copytree(source / "logs", target / "logs", dirs_exist_ok=True)
            partial = target / "checkpoints" / f".copy_{found[-1].name}"  # not a checkpoint until renamed
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(found[-1], partial)
            partial.rename(partial.with_name(found[-1].name))
        return self.stage("reward", name, self.reward_flags(weight, self.extend_steps, align_final))

    def analysis(self) -> dict:
        start = time.time()
        out = self.out / "analysis"
        run([sys.executable, "-m", "longalign.analyze_preference", "--model", str(self.world / "preference"),
             "--prompts", str(self.world / "data" / "eval_prompts.txt"), "--images", str(self.world / "data" / "eval"),
             "--out", str(out), "--device", "cpu", "--segmenter", "legacy", "--overwrite"], ROOT)  # fmt: skip (a cut-off study redoes it)
        self.timed("analysis", start)
        return {
            "retrieval": json.loads((out / "retrieval.json").read_text()),
            "eta": json.loads((out / "eta.json").read_text()),
            "decomposition": json.loads((out / "decomposition.json").read_text()),
        }

    # -------------------------------------------------------------------------- all
    def run_all(self) -> None:
        """Every step in order; on a rerun with the same --out, finished steps are skipped."""
        total = time.time()
        self.make()
        if not self.done("analysis"):
            self.results["analysis"] = self.analysis()
        self.train_base()
        self.evaluation("base", [], long=False)
        align_final = self.align()
        self.evaluation("aligned", [align_final], long=True)
        self.evaluation("aligned_truncated", [align_final], long=False)
        rewards = self.results.setdefault("reward", {})
        for weight in WEIGHTS:
            folder = self.reward(weight, align_final)
            rewards.setdefault(weight, {})["curves"] = tensorboard_scalars(folder / "logs")
            if "eval" not in rewards[weight]:
                rewards[weight]["eval"] = self.evaluate(f"reward_w{weight}", [align_final, folder / "final"], long=True)
            self.save()
        if self.extend_steps:
            self.run_extended(align_final)
        self.results["timings_s"]["total_this_run"] = round(time.time() - total, 1)
        self.save()
        write_report_files(self.results, self.report)
        log(f"report: {self.report / 'REPORT.md'}")

    def run_extended(self, align_final: Path) -> None:
        """Step 6: `EXTEND_WEIGHTS` continued to `extend_steps`, into `results["reward_extended"]`."""
        extended = self.results.setdefault("reward_extended", {"steps": self.extend_steps, "runs": {}})
        if extended["steps"] != self.extend_steps:
            raise SystemExit(f"this study was extended to {extended['steps']} reward steps; pass --extend_reward {extended['steps']}")
        for weight in EXTEND_WEIGHTS:
            folder = self.extend_reward(weight, align_final)
            run = extended["runs"].setdefault(weight, {})
            run["curves"] = tensorboard_scalars(folder / "logs")
            if "eval" not in run:
                run["eval"] = self.evaluate(f"reward_w{weight}_to{self.extend_steps}", [align_final, folder / "final"], long=True)
            self.save()

    def evaluation(self, name: str, init_from: list[Path], long: bool) -> None:
        """`self.results[name]` = `evaluate(...)` unless an earlier run saved it."""
        if name not in self.results:
            self.results[name] = self.evaluate(name, init_from, long)
            self.save()


# ------------------------------------------------------------------------------ report
def _row(name: str, per_seed: dict) -> str:
    cells = []
    for key in ("before", "straddles", "after"):
        values = [r[key]["colour"] for r in per_seed.values()]
        cells.append(" / ".join(f"{v:.2f}" for v in values))
    after_cs = " / ".join(f"{r['after']['colour_shape']:.2f}" for r in per_seed.values())
    hall = " / ".join(f"{r['hallucination']:.2f}" for r in per_seed.values())
    return f"| {name} | {' | '.join(cells)} | {after_cs} | {hall} |"


def _curve_summary(curve: list[tuple[int, float]]) -> str:
    if not curve:
        return "-"
    k = max(len(curve) // 10, 1)
    first = sum(v for _, v in curve[:k]) / len(curve[:k])
    last = sum(v for _, v in curve[-k:]) / len(curve[-k:])
    return f"{first:.3f} -> {last:.3f}"


CURVES = {  # tensorboard tag -> panel title
    "score": "reward x.t (w = 1)",
    "score_text_relevant": "text-relevant x.t_perp",
    "score_text_irrelevant": "text-irrelevant x.(eta V)",
    "eta": "eta",
    "text_relevant_norm": "|t_perp|",
    "text_irrelevant_weight": "w used",
}


def plot_curves(runs: dict, path: Path) -> bool:
    """One panel per logged quantity of reward runs (w -> {"curves": ...}), one line per w, over
    optimizer steps. Returns False (and writes nothing) when no run has logged yet."""
    rewards = {w: r["curves"] for w, r in runs.items() if r.get("curves")}
    if not rewards:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for axis, (tag, title) in zip(axes, CURVES.items()):
        for weight, curves in rewards.items():
            if curves.get(tag):
                steps, values = zip(*curves[tag])
                axis.plot(steps, values, label=f"w = {weight}")
        axis.set_title(title)
        axis.set_xlabel("step")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return True


def _claim2_row(per_seed: dict, *labels: object) -> str:
    """One claim-2 table row: `labels`, then the first sampling seed's oracle metrics and reward parts."""
    first = per_seed[next(iter(per_seed))]
    p = first["preference"]
    return (
        f"| {' | '.join(map(str, labels))} | {first['after']['colour']:.3f} | {first['all']['colour_shape']:.3f} | {first['hallucination']:.3f} | "
        f"{p['score']:.4f} | {p['text_relevant']:.4f} | {p['text_irrelevant']:.4f} |"
    )


def _curve_table(runs: dict, png: str) -> list[str]:
    """The training-curve summary of reward runs (w -> {"curves": ...}) as markdown lines."""
    lines = [
        "",
        f"Training curves (mean of the first -> last tenth of the logged steps; every step in `{png}`):",
        "",
        "| w | w used | score | text-relevant | text-irrelevant | eta | abs(t_perp) |",
        "|---|---|---|---|---|---|---|",
    ]
    for w, r in runs.items():
        c = r["curves"]
        lines.append(
            f"| {w} | {_curve_summary(c.get('text_irrelevant_weight', []))} | {_curve_summary(c.get('score', []))} | {_curve_summary(c.get('score_text_relevant', []))} | "
            f"{_curve_summary(c.get('score_text_irrelevant', []))} | {_curve_summary(c.get('eta', []))} | "
            f"{_curve_summary(c.get('text_relevant_norm', []))} |"
        )
    return lines


def write_report(results: dict) -> str:
    seeds = " / ".join(str(s) for s in results["scale"]["sample_seeds"])
    lines = [
        "# Toy world: the LongAlign claims on a synthetic long-prompt world",
        "",
        f"Generated by `python bench/toyworld.py` (device {results['device']}, training seed {results['seed']}; "
        f"sizes: {results['scale']}). Held-out objects by position: {results['eval_objects_by_position']}. "
        f"Cells show one value per sampling seed ({seeds}).",
        "",
        f"VAE round trip on held-out images: MSE {results['vae_reconstruction']['mse']:.5f}, oracle colour+shape "
        f"{results['vae_reconstruction']['oracle']['all']['colour_shape']:.3f}. Legacy segmenter = pySBD segments: "
        f"{results['legacy_segmenter_equals_sentences']}.",
        "",
        "## Claim 1: segment-level encoding makes facts after token 77 reachable (paper §3)",
        "",
        "Colour accuracy per stated object, by where its sentence lies relative to the 77-token window.",
        "",
        "| model | before 77 | straddles | after 77 | colour+shape after 77 | hallucination |",
        "|---|---|---|---|---|---|",
        _row("base (77-token CLIP, the toy SD1.5)", results["base"]),
        _row("base + align stage (segment-level CLIP)", results["aligned"]),
        *([_row("base + align stage, prompt cut to 77 tokens", results["aligned_truncated"])] if "aligned_truncated" in results else []),
        "",
        "Samples (first 16 held-out captions): `base.png`, `aligned.png`.",
        "",
        "## Claim 2: down-weighting the text-irrelevant part of the reward (paper §4)",
        "",
        "Same steps, seeds and data for every w; evaluation on held-out captions (V = their common direction).",
        "",
        "| w | colour after 77 | colour+shape all | hallucination | reward x.t | text-relevant | text-irrelevant |",
        "|---|---|---|---|---|---|---|",
    ]
    rewards = {w: r for w, r in results.get("reward", {}).items() if "eval" in r}
    rows = [("align (no reward)", results["aligned"])] + [(f"w = {w}", r["eval"]) for w, r in rewards.items()]
    lines += [_claim2_row(per_seed, name) for name, per_seed in rows]
    lines += _curve_table(rewards, "reward_curves.png")
    extended = results.get("reward_extended", {})
    finished = {w: r for w, r in extended.get("runs", {}).items() if "eval" in r}
    if finished:
        steps, first = extended["steps"], results["scale"]["reward_steps"]
        lines += [
            "",
            f"### Continued to {steps} steps (`--extend_reward {steps}`)",
            "",
            f"The w = {', '.join(finished)} runs above, continued from their step-{first} checkpoints (same data order and learning rate).",
            "",
            "| w | steps | colour after 77 | colour+shape all | hallucination | reward x.t | text-relevant | text-irrelevant |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for w, r in finished.items():
            if w in rewards:
                lines.append(_claim2_row(rewards[w]["eval"], f"w = {w}", first))
            lines.append(_claim2_row(r["eval"], f"w = {w}", steps))
        lines += _curve_table(finished, f"reward_curves_to{steps}.png")
    analysis = results["analysis"]
    retrieval = analysis["retrieval"]
    lines += [
        "",
        "## The preference analysis (paper Fig. 2, Table 1) — `longalign.analyze_preference`",
        "",
        f"Held-out rendered images and their captions ({analysis['eta']['prompts']} pairs), segment-level text embeddings.",
        "",
        "| text embedding | R@1 single (first 77 tokens) | R@1 segment average |",
        "|---|---|---|",
        f"| original | {retrieval['single']['original']:.3f} | {retrieval['segment']['original']:.3f} |",
        f"| text-relevant | {retrieval['single']['text_relevant']:.3f} | {retrieval['segment']['text_relevant']:.3f} |",
        "",
        f"eta (segment mode): mean {analysis['eta']['eta']['mean']:.3f}; |t_perp| mean "
        f"{analysis['eta']['text_relevant_norm']['mean']:.3f}. Paired minus unpaired score: "
        + ", ".join(f"{k} {v:.4f}" for k, v in analysis["decomposition"]["paired_minus_unpaired"].items())
        + ".",
        "",
        "## Timings (seconds)",
        "",
        "| step | s |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in results["timings_s"].items()],
        "",
    ]
    return "\n".join(lines)


def write_report_files(results: dict, folder: Path) -> None:
    """`REPORT.md` and, once reward runs have logged, `reward_curves.png` (and `reward_curves_toN.png`
    for the continued runs) in `folder`."""
    plot_curves(results.get("reward", {}), folder / "reward_curves.png")
    extended = results.get("reward_extended")
    if extended:
        plot_curves(extended["runs"], folder / f"reward_curves_to{extended['steps']}.png")
    (folder / "REPORT.md").write_text(write_report(results))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report_only", default=None, help="rewrite REPORT.md from this results.json (e.g. of a cut-off run)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "toyworld_run"), help="work folder (world, runs, report/)")
    parser.add_argument("--scale", default="full", choices=sorted(SCALES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--extend_reward", type=int, default=None, metavar="STEPS",
        help="then continue the w = 1, 0.3 and auto reward runs to STEPS optimizer steps and evaluate them",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.report_only:
        write_report_files(json.loads(Path(args.report_only).read_text()), Path(args.report_only).parent)
        return
    Study(Path(args.out), SCALES[args.scale], args.device, args.seed, args.extend_reward).run_all()


if __name__ == "__main__":
    main()
