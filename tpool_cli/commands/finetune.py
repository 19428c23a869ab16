"""`tpool finetune`: fine-tune a patched model with its operator in place, then evaluate it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..cli_options import (
    AmpOpt, ClassMapOpt, CompileOpt, DataModelOpt, DeviceOpt, FeaturesOpt, KnnOpt, LinkageOpt, InitOpt, ItersOpt, KeepOpt, LayersOpt,
    OpOptOpt, OpsOpt, PropAttnOpt, ROpt, ScoreOpt, SeedOpt, TokensOpt, WeightsOpt, WorkersOpt, op_options, parse_schedule_args, split_names,
)
from ..errors import TpoolError
from ..output import make_table, stderr, stdout



def finetune(
    model: DataModelOpt = None,
    weights: WeightsOpt = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Train folder DIR/<class>/<image> (default: the demo's training split).")] = None,
    val: Annotated[Optional[Path], typer.Option("--val", help="Validation folder, same classes (evaluated after every epoch).")] = None,
    class_map: ClassMapOpt = None,
    op: OpsOpt = "kmeans",
    keep: KeepOpt = None,
    layers: LayersOpt = None,
    tokens: TokensOpt = None,
    r: ROpt = None,
    prop_attn: PropAttnOpt = None,
    seed: SeedOpt = 0,
    score: ScoreOpt = None,
    iters: ItersOpt = None,
    init: InitOpt = None,
    features: FeaturesOpt = None,
    linkage: LinkageOpt = None,
    knn: KnnOpt = None,
    op_opt: OpOptOpt = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Epochs of fine-tuning.")] = 5,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (AdamW, cosine; default 1e-4, the demo 5e-4).")] = None,
    warmup_epochs: Annotated[float, typer.Option("--warmup-epochs", min=0.0, help="Linear warm-up, in epochs.")] = 0.5,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0)] = 0.05,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per update (per rank under torchrun).")] = 64,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", min=0.0, max=1.0)] = 0.1,
    distill: Annotated[bool, typer.Option("--distill/--no-distill", help="Distil from the unpatched model (KL on logits).")] = True,
    distill_alpha: Annotated[float, typer.Option("--distill-alpha", help="Weight of the distillation loss.")] = 0.5,
    crop_scale: Annotated[Optional[float], typer.Option("--crop-scale", help="Lower bound of the random-resized-crop area (default 0.35, the demo 0.75).")] = None,
    hflip: Annotated[Optional[float], typer.Option("--hflip", help="Horizontal flip probability (default 0.5, the demo 0).")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Stop after this many updates in all (a quick try).")] = None,
    workers: WorkersOpt = 0,
    device: DeviceOpt = "auto",
    amp: AmpOpt = None,
    compile: CompileOpt = False,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from OUT/last.pt when it is from the same fine-tune.")] = True,
    out: Annotated[Path, typer.Option("--out", help="Output folder: model.safetensors, model.json, train_log.jsonl, results.jsonl, last.pt.")] = Path("runs/finetune"),
) -> None:
    """Fine-tune with the operator in place (timm AdamW + cosine, distillation from the unpatched model), then evaluate."""
    from ..demo import DEMO_MODEL, ensure_demo_data
    from ..device import resolve_device
    from ..distributed import local_device
    from ..data import scan_folder
    from ..finetune import FinetuneSettings, finetune as run_finetune
    from ..models import load_model
    from ..patch import patch
    from ..profile import build_configs

    dev = local_device(resolve_device(device))  # under torchrun: cuda:LOCAL_RANK
    names = split_names(op)
    if len(names) != 1:
        raise TpoolError(f"finetune trains one operator, got {len(names)} ({op})")
    keeps, layer_list, token_list, rs = parse_schedule_args(keep, layers, tokens, r=r, sweep=False)
    if keeps is not None and len(keeps) > 1:
        raise TpoolError(f"finetune trains one schedule, got --keep {keep}")
    if rs is not None and len(rs) > 1:
        raise TpoolError(f"finetune trains one schedule, got {len(rs)} --r schedules")
    configs = build_configs(names, keeps, layer_list, token_list, rs, **op_options(op_opt, score=score, iters=iters, init=init, features=features, linkage=linkage, knn=knn))
    if not configs:
        raise TpoolError("the baseline (op none) reduces no token: nothing to fine-tune for")
    demo = data is None
    if demo:
        if model not in (None, DEMO_MODEL) or val is not None or class_map is not None:
            raise TpoolError("--data TRAIN_FOLDER is required unless fine-tuning the built-in demo (no --model/--val/--class-map)")
        model, train_data, val_data = DEMO_MODEL, ensure_demo_data(split="train"), ensure_demo_data(split="test")
        data, val, class_map = train_data.root, val_data.root, train_data.class_map
        stderr.print(f"[cyan]built-in demo:[/cyan] fine-tuning {DEMO_MODEL} on its {train_data.num_images} training digits, "
                     f"evaluating on the {val_data.num_images} test digits", highlight=False)
    from ..finetune import DEMO_FINETUNE_DEFAULTS  # digits: small model, not flip-invariant

    defaults = DEMO_FINETUNE_DEFAULTS if demo else {}
    settings = FinetuneSettings(
        epochs=epochs, lr=lr if lr is not None else defaults.get("lr", 1e-4), warmup_epochs=warmup_epochs,
        weight_decay=weight_decay, batch_size=batch_size, label_smoothing=label_smoothing, distill=distill,
        distill_alpha=distill_alpha, crop_scale=crop_scale if crop_scale is not None else defaults.get("crop_scale", 0.35),
        hflip=hflip if hflip is not None else defaults.get("hflip", 0.5), seed=seed, max_steps=max_steps,
    )
    train_folder = scan_folder(data, class_map=class_map)
    val_folder = scan_folder(val, class_map=class_map) if val is not None else None
    loaded = load_model(model or "deit_small_patch16_224", weights=weights)
    operator, schedule = configs[0]
    patch(loaded.model, operator, schedule=schedule, prop_attn=prop_attn, seed=seed)
    result = _run(run_finetune, loaded, train_folder, val_folder, out, settings, dev, amp, compile, workers, resume)
    _print(result, out)


def _run(run_finetune, loaded, train, val, out, settings, dev, amp, compile, workers, resume):
    from ..finetune import FinetuneCallbacks
    from ..progress import make_progress

    with make_progress() as progress:
        task = {"id": None}

        def epoch_start(epoch: int, epochs: int, files: int) -> None:
            if task["id"] is not None:
                progress.remove_task(task["id"])
            task["id"] = progress.add_task(f"epoch {epoch}/{epochs}", total=files)

        def batch(files: int, loss: float) -> None:
            progress.update(task["id"], advance=files, description=f"loss {loss:.4f}")

        def epoch_end(entry: dict) -> None:
            val = f", val top-1 {entry['val_top1']:.2f}%" if "val_top1" in entry else ""
            progress.console.print(f"epoch {entry['epoch']}: loss {entry['loss']}, lr {entry['lr']:.2e}{val}", highlight=False)

        try:
            return run_finetune(loaded, train, val, out, settings, device=dev, amp=amp, compile=compile, workers=workers or 0,
                                resume=resume, callbacks=FinetuneCallbacks(epoch_start, batch, epoch_end))
        except KeyboardInterrupt:
            progress.stop()
            stderr.print(f"[yellow]interrupted:[/yellow] the last completed epoch is kept in {out / 'last.pt'}; "
                         "run the same command again to resume")
            sys.exit(130)


def _print(result, out: Path) -> None:
    if result.resumed_epochs:
        stderr.print(f"resumed after epoch {result.resumed_epochs} from {out / 'last.pt'}")
    rows = [(str(e["epoch"]), f"{e['loss']:.4f}" if e["loss"] is not None else "-", f"{e['lr']:.2e}",
             f"{e['val_top1']:.2f}" if "val_top1" in e else "-", f"{e['train_img_s']:.1f}" if e.get("train_img_s") else "-")
            for e in result.state.log]
    table = make_table("fine-tune", ["epoch", "train loss", "lr", "val top-1 %", "train img/s"], rows,
                       caption=f"weights: {result.model_path} (load with --weights)")
    stdout.print(table)
    if result.row is not None:
        r = result.row
        stdout.print(f"{r['op']} {r['schedule']}: top-1 {r['top1']:.2f}% top-5 {r['top5']:.2f}% on {r['images']} images, "
                      f"{r['gmacs']:.4f} GMACs", highlight=False)
