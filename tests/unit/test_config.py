"""The typed config: defaults, recipes with bases, dotted overrides, clear errors, lossless YAML."""

import ast
import inspect
import itertools
from pathlib import Path

import pytest
import yaml

from dist_bot import config as config_module
from dist_bot.config import Config, all_keys, from_dict, load_config, to_yaml
from dist_bot.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "configs").glob("**/*.yaml"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_are_the_papers_tricks():
    cfg = Config()
    assert cfg.model.zero_gamma and cfg.optim.no_bias_decay and cfg.optim.nesterov
    assert (cfg.optim.base_lr_per_256, cfg.optim.ref_batch, cfg.optim.momentum) == (0.1, 256, 0.9)
    assert cfg.optim.weight_decay == 1e-4
    assert (cfg.schedule.warmup_epochs, cfg.schedule.decay) == (5.0, "cosine")
    assert (cfg.loss.label_smoothing, cfg.loss.smoothing_form) == (0.1, "paper")
    assert cfg.loss.distill.temperature == 20.0
    assert cfg.strategy == "ddp"
    # LARS and poly decay are opt-in, with the LARS paper's / MLPerf's eta, eps and power
    assert (cfg.optim.name, cfg.optim.lars_eta, cfg.optim.lars_eps) == ("sgd", 0.001, 0.0)
    assert (cfg.schedule.poly_power, cfg.schedule.end_lr) == (2.0, 0.0)


def test_recipe_and_overrides_resolve_in_order(tmp_path):
    write(tmp_path / "base.yaml", "model: {name: resnet50d}\nschedule: {epochs: 90}\ndata: {batch_size: 64}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nschedule: {epochs: 200}\nprecision: fp16\n")
    cfg = load_config(child, ["data.batch_size=128", "optim.base_lr_per_256=0.2", "loss.mixup_alpha=0.2"])
    assert cfg.model.name == "resnet50d"  # from the base
    assert cfg.schedule.epochs == 200  # child beats base
    assert cfg.data.batch_size == 128  # override beats both
    assert cfg.optim.base_lr_per_256 == 0.2 and isinstance(cfg.optim.base_lr_per_256, float)
    assert cfg.precision == "fp16"
    assert cfg.schedule.warmup_epochs == 5.0  # untouched: the default
    assert cfg.run.name == "child"  # a run is named after its recipe unless told otherwise


def test_base_chain_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: a.yaml -> b.yaml -> a.yaml"):
        load_config(tmp_path / "a.yaml")


def test_override_values_are_typed_by_the_schema():
    cfg = load_config(
        None,
        [
            "optim.weight_decay=5e-5",  # YAML 1.1 reads this as a string; the schema says float
            "run.name=007",  # a string field stays verbatim
            "model.num_classes=10",
            "data.val_batch_size=null",
            "data.mean=[0.5,0.5,0.5]",
            "wandb.tags=[ablation,cosine]",
            "optim.grad_clip_norm=1",  # int accepted for an optional float
        ],
    )
    assert cfg.optim.weight_decay == 5e-5
    assert cfg.run.name == "007"
    assert cfg.model.num_classes == 10
    assert cfg.data.val_batch_size is None
    assert cfg.data.mean == (0.5, 0.5, 0.5)
    assert cfg.wandb.tags == ("ablation", "cosine")
    assert cfg.optim.grad_clip_norm == 1.0 and isinstance(cfg.optim.grad_clip_norm, float)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=0.4", r"unknown config key 'optim.lr'\. .*Valid keys at 'optim': name, base_lr_per_256"),
        ("precison=fp16", r"unknown config key 'precison'\. Did you mean precision\?"),
        ("optim.epochs=90", r"unknown config key 'optim.epochs'\. Did you mean schedule.epochs"),
        ("modle.name=resnet50d", r"Did you mean model.name"),
        ("schedule.epochs=ninety", r"'schedule.epochs' expects an integer, got 'ninety'"),
        ("schedule.epochs=90.5", r"'schedule.epochs' expects an integer, got 90.5"),
        ("model.zero_gamma=1", r"'model.zero_gamma' expects true or false, got 1"),
        ("optim.momentum=fast", r"'optim.momentum' expects a number, got 'fast'"),
        (
            "precision=fp61",
            r"'precision' must be one of 'fp32', 'fp16', 'bf16', got 'fp61'\. Did you mean 'fp16'\?",
        ),
        ("strategy=zero", r"'strategy' must be one of 'ddp', 'fsdp', 'deepspeed'"),
        ("data.mean=0.5", r"'data.mean' expects a list of a number"),
        ("optim=sgd", r"'optim' is a section, not a value"),
        ("schedule.epochs", r"not key=value"),
        ("data.batch_size=0", r"data.batch_size=0 is out of range: it must lie in \[1, inf\)"),
        ("loss.label_smoothing=1.0", r"loss.label_smoothing=1.0 is out of range"),
        ("schedule.warmup_epochs=500", r"warmup_epochs=500.0 exceeds schedule.epochs=120"),
        ("optim.name=lamb", r"'optim.name' must be one of 'sgd', 'lars', got 'lamb'"),
        ("schedule.decay=polynomial", r"'schedule.decay' must be one of 'cosine', 'step', 'poly', 'constant'"),
        ("optim.lars_eta=0", r"optim.lars_eta=0.0 is out of range: it must lie in \(0, inf\)"),
    ],
)
def test_bad_overrides_fail_with_a_message_that_names_the_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_compile_mode_is_inductors_and_reaches_torch_compile_with_it_only():
    inductor = load_config(None, ["model.compile_mode=max-autotune"]).model
    assert config_module.compile_options(inductor) == {"backend": "inductor", "mode": "max-autotune"}
    traced = load_config(None, ["model.compile_backend=aot_eager"]).model
    assert config_module.compile_options(traced) == {"backend": "aot_eager"}
    with pytest.raises(ConfigError, match=r"compile_mode=max-autotune is one of inductor's .* set model\.compile_b"):
        load_config(None, ["model.compile_backend=cudagraphs", "model.compile_mode=max-autotune"])


def test_misspelt_key_in_a_recipe_is_an_error(tmp_path):
    recipe = write(tmp_path / "r.yaml", "schedule:\n  epoch: 90\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'schedule.epoch'\. Did you mean schedule.epochs"):
        load_config(recipe)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n- b\n", "must be a mapping"),
        ("model: [1, 2]\n", "section 'model' must be a mapping"),
        ("model: {name: [unclosed\n", "not valid YAML"),
        ("base: 3\n", "'base' must be a path"),
        ("base: missing.yaml\n", r"missing.yaml does not exist"),
    ],
)
def test_malformed_recipes_are_reported(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path / "r.yaml", text))


def test_recipes_are_data_not_code(tmp_path):
    recipe = write(tmp_path / "r.yaml", "run: {name: !!python/object/apply:os.system [echo pwned]}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(recipe)


def test_yaml_round_trip_is_lossless():
    cfg = load_config(
        None,
        [
            "model.num_classes=10",
            "optim.base_lr_per_256=0.30000000000000004",  # needs every digit
            "optim.weight_decay=5e-5",
            "data.path=/data/imagenet",
            "data.mean=[0.1,0.2,0.3]",
            "schedule.step_milestones=[2,4]",
            "wandb.tags=[a,b]",
            "run.name=007",
            "precision=bf16",
        ],
    )
    text = to_yaml(cfg)
    again = from_dict(yaml.safe_load(text))
    assert again == cfg
    assert to_yaml(again) == text


def test_resolved_config_round_trips_through_a_recipe_file(tmp_path):
    cfg = load_config(REPO / "configs" / "resnet50d_bs1024.yaml", ["schedule.epochs=10", "data.path=/data"])
    path = write(tmp_path / "config.yaml", to_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert cfg.run.name == recipe.stem


def test_paper_recipes_hold_the_papers_numbers():
    eff = load_config(REPO / "configs" / "resnet50d_bs1024.yaml")
    assert eff.model.name == "resnet50d" and eff.precision == "fp16"
    assert eff.data.global_batch_size == 1024 and eff.optim.base_lr_per_256 * 1024 / 256 == pytest.approx(0.4)
    assert (eff.schedule.epochs, eff.schedule.warmup_epochs, eff.schedule.decay) == (200, 5.0, "cosine")
    assert (eff.loss.label_smoothing, eff.loss.mixup_alpha) == (0.1, 0.2)
    base = load_config(REPO / "configs" / "resnet50_baseline_bs256.yaml")
    assert base.model.name == "resnet50a" and not base.model.zero_gamma and not base.optim.no_bias_decay
    assert (base.schedule.decay, base.schedule.step_milestones, base.schedule.warmup_epochs) == (
        "step",
        (30, 60, 90),
        0,
    )
    assert base.loss.label_smoothing == 0 and base.loss.mixup_alpha == 0 and base.precision == "fp32"
    assert (base.data.global_batch_size, base.optim.base_lr_per_256, base.schedule.epochs) == (256, 0.1, 120)
    distill = load_config(REPO / "configs" / "resnet50d_distill_bs1024.yaml")
    teacher = load_config(REPO / "configs" / "resnet152d_bs1024.yaml")
    assert distill.loss.distill.teacher == f"{teacher.run.out_dir}/{teacher.run.name}"  # the teacher recipe's run
    assert distill.loss.distill.temperature == 20 and distill.loss.mixup_alpha == 0.2
    assert teacher.model.name == "resnet152d" and teacher.data.global_batch_size == 1024


def test_lars_recipes_hold_mlperfs_numbers():
    """lars_opt_base_learning_rate 10.0 at 8k and 29.0 at 32k (the lr at the global batch), poly power 2 to 1e-4,
    eps 0, eta 0.001, and the warmup, epochs, momentum and weight decay of each file's cited set."""
    for name, batch, lr, warmup, epochs, momentum, wd in (
        ("resnet50d_lars_bs8k", 8192, 10.0, 5, 56, 0.9, 2e-4),
        ("resnet50d_lars_bs32k", 32768, 29.0, 18, 64, 0.929, 1e-4),
    ):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        o, s = cfg.optim, cfg.schedule
        assert (o.name, o.lars_eta, o.lars_eps, o.nesterov, o.no_bias_decay) == ("lars", 0.001, 0.0, False, True)
        assert cfg.data.global_batch_size == batch and o.base_lr_per_256 * batch / o.ref_batch == pytest.approx(lr)
        assert (s.decay, s.poly_power, s.end_lr, s.warmup_epochs, s.epochs) == ("poly", 2.0, 1e-4, warmup, epochs)
        assert (o.momentum, o.weight_decay, cfg.loss.label_smoothing) == (momentum, wd, 0.1)
    runs = {p.stem: load_config(p) for p in (REPO / "configs" / "imagenette" / "lars").glob("*.yaml")}
    assert sorted(runs) == ["lars_bs2048", "sgd_bs2048", "sgd_bs256"]
    for name, cfg in runs.items():  # the same model, data, epochs and schedule; only optimizer and batch differ
        assert changed_keys(runs["sgd_bs256"], cfg) <= {
            "data.global_batch_size",
            "optim.name",
            "optim.base_lr_per_256",
            "optim.nesterov",
            "optim.weight_decay",
        }, name
    lars = runs["lars_bs2048"]
    assert lars.optim.name == "lars" and lars.optim.base_lr_per_256 * 2048 / 256 == pytest.approx(8.5)


def test_todays_recipes_hold_their_sources_numbers():
    """torchvision's new ResNet-50 recipe and an RSB-A3-style one, as their headers cite them."""
    tv = load_config(REPO / "configs" / "resnet50_torchvision_new.yaml")
    d, o, lo = tv.data, tv.optim, tv.loss
    assert (tv.model.name, tv.schedule.epochs, tv.schedule.warmup_epochs, d.global_batch_size) == (
        "resnet50",
        600,
        5,
        1024,
    )
    assert o.base_lr_per_256 * 1024 / o.ref_batch == pytest.approx(0.5) and o.weight_decay == 2e-5
    assert (d.image_size, d.val_image_size, round(d.val_image_size / d.val_resize_ratio)) == (176, 224, 232)
    assert (d.auto_augment, d.random_erasing, d.repeated_aug, d.color_jitter, d.pca_lighting) == (
        "trivial",
        0.1,
        4,
        0,
        0,
    )
    assert (lo.label_smoothing, lo.smoothing_form, lo.mixup_alpha, lo.cutmix_alpha) == (0.1, "torch", 0.2, 1.0)
    a3 = load_config(REPO / "configs" / "resnet50_rsb_a3.yaml")
    d = a3.data
    assert (a3.schedule.epochs, d.global_batch_size, d.image_size, d.val_image_size, d.val_resize_ratio) == (
        100,
        2048,
        160,
        224,
        0.95,
    )
    assert (d.auto_augment, d.auto_augment_ops, d.auto_augment_magnitude, d.repeated_aug) == ("rand", 2, 18, 1)
    assert (a3.loss.mixup_alpha, a3.loss.cutmix_alpha, d.interpolation, d.val_interpolation) == (
        0.1,
        1.0,
        "random",
        "bicubic",
    )


def test_imagenette_ladder_adds_one_trick_per_rung():
    rungs = [load_config(p) for p in sorted((REPO / "configs" / "imagenette").glob("[0-9]_*.yaml"))]
    assert len(rungs) == 6
    top = rungs[-1]
    assert (top.model.name, top.data.image_size, top.data.batch_size, top.schedule.epochs) == ("resnet50d", 128, 32, 5)
    assert (top.schedule.decay, top.loss.label_smoothing, top.loss.mixup_alpha) == ("cosine", 0.1, 0.2)
    assert rungs[0].model.name == "resnet50a" and rungs[0].schedule.decay == "step" and not rungs[0].model.zero_gamma
    for a, b in itertools.pairwise(rungs):  # each rung differs from the one before in its own trick
        changed = changed_keys(a, b)
        assert changed, f"{b.run.name} changes nothing"
        assert len(changed) <= 3, f"{b.run.name} changes more than one trick: {changed}"


def test_paper_ladder_adds_the_papers_steps_and_ends_at_the_paper_recipes():
    ladder = REPO / "configs" / "paper_ladder"
    rung = {p.stem: load_config(p) for p in ladder.glob("*.yaml")}
    steps = {  # rung: (the rung below it, the keys it changes)
        "1_efficient": (
            "0_baseline",
            {
                "model.zero_gamma",
                "data.loader",
                "data.global_batch_size",
                "optim.no_bias_decay",
                "schedule.warmup_epochs",
                "precision",
            },
        ),
        "2_resnet50d": ("1_efficient", {"model.name"}),
        "3_cosine": ("2_resnet50d", {"schedule.decay"}),
        "4_label_smoothing": ("3_cosine", {"loss.label_smoothing"}),
        "5a_distill": ("4_label_smoothing", {"loss.distill.teacher"}),
        "5b_mixup": ("4_label_smoothing", {"loss.mixup_alpha", "schedule.epochs"}),
        "6_distill_mixup": ("5b_mixup", {"loss.distill.teacher"}),
    }
    assert set(rung) == {"0_baseline", *steps}
    for name, (below, keys) in steps.items():
        assert changed_keys(rung[below], rung[name]) == keys, name
    assert rung["1_efficient"].optim.base_lr_per_256 * 1024 / 256 == pytest.approx(0.4)  # linear scaling
    for name, recipe in [
        ("0_baseline", "resnet50_baseline_bs256.yaml"),
        ("5b_mixup", "resnet50d_bs1024.yaml"),
        ("6_distill_mixup", "resnet50d_distill_bs1024.yaml"),
    ]:
        assert changed_keys(load_config(REPO / "configs" / recipe), rung[name]) == set(), name


def test_every_default_has_a_one_line_comment():
    """The schema is the documentation: each field's line in config.py ends with a `# ...` comment."""
    source = inspect.getsource(config_module)
    lines = source.splitlines()
    dataclass_nodes = [
        n
        for n in ast.parse(source).body
        if isinstance(n, ast.ClassDef) and any(getattr(d, "id", None) == "dataclass" for d in n.decorator_list)
    ]
    assert len(dataclass_nodes) >= 10
    undocumented = [
        f"{node.name}.{stmt.target.id}"
        for node in dataclass_nodes
        for stmt in node.body
        if isinstance(stmt, ast.AnnAssign)
        and "default_factory" not in lines[stmt.lineno - 1]  # a section: its own fields carry the comments
        and "# " not in lines[stmt.lineno - 1]
    ]
    assert not undocumented, f"config fields without a comment: {undocumented}"
    assert len(all_keys()) > 60


def changed_keys(a, b) -> set[str]:
    """The dotted keys whose values differ from config a to config b, the run's name aside."""
    fa, fb = flat(a), flat(b)
    return {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)} - {"run.name"}


def flat(cfg) -> dict:
    from dist_bot.config import to_dict
    from dist_bot.train.state import flat_keys

    return flat_keys(to_dict(cfg))


# The tables as they were typed by hand before each field carried its own range and resume flag
# (config.param): a field that loses its metadata, or gains some by accident, changes what is checked.
EXPECTED_RANGES = {
    "model.num_classes": "[1, inf)",
    "model.ema_decay": "[0, 1)",
    "data.image_size": "[1, inf)",
    "data.val_image_size": "[1, inf)",
    "data.val_resize_ratio": "(0, 1]",
    "data.batch_size": "[1, inf)",
    "data.val_batch_size": "[1, inf)",
    "data.global_batch_size": "[1, inf)",
    "data.max_batch_size": "[1, inf)",
    "data.workers": "[0, inf)",
    "data.dali_py_workers": "[0, inf)",
    "data.dali_hw_decoder_load": "[0, 1]",
    "data.min_crop_area": "(0, 1]",
    "data.color_jitter": "[0, 1]",
    "data.pca_lighting": "[0, inf)",
    "data.auto_augment_ops": "[1, inf)",
    "data.auto_augment_magnitude": "[0, 30]",
    "data.random_erasing": "[0, 1]",
    "data.repeated_aug": "[1, inf)",
    "data.progressive.min_size": "[1, inf)",
    "data.progressive.start_epoch": "[0, inf)",
    "data.progressive.end_epoch": "[1, inf)",
    "data.progressive.step": "[1, inf)",
    "optim.base_lr_per_256": "[0, inf)",
    "optim.ref_batch": "[1, inf)",
    "optim.momentum": "[0, 1)",
    "optim.weight_decay": "[0, inf)",
    "optim.grad_accum_steps": "[1, inf)",
    "optim.grad_clip_norm": "(0, inf)",
    "optim.lars_eta": "(0, inf)",
    "optim.lars_eps": "[0, inf)",
    "optim.backbone_lr_scale": "[0, inf)",
    "schedule.epochs": "[1, inf)",
    "schedule.warmup_epochs": "[0, inf)",
    "schedule.step_gamma": "(0, 1]",
    "schedule.poly_power": "(0, inf)",
    "schedule.end_lr": "[0, inf)",
    "schedule.warmup_lr": "[0, inf)",
    "loss.label_smoothing": "[0, 1)",
    "loss.mixup_alpha": "[0, inf)",
    "loss.cutmix_alpha": "[0, inf)",
    "loss.distill.temperature": "(0, inf)",
    "loss.distill.hard_weight": "[0, inf)",
    "loss.distill.soft_weight": "[0, inf)",
    "loss_scale.init_scale": "(0, inf)",
    "loss_scale.growth_interval": "[1, inf)",
    "loss_scale.backoff_factor": "(0, 1)",
    "loss_scale.min_scale": "(0, inf)",
    "loss_scale.max_steps_at_min": "[1, inf)",
    "dist.timeout_min": "(0, inf)",
    "dist.hang_timeout_min": "[0, inf)",
    "dist.zero_stage": "[0, 3]",
    "run.keep_checkpoints": "[1, inf)",
    "run.checkpoint_every_epochs": "[1, inf)",
    "run.eval_every_epochs": "[1, inf)",
    "run.log_every_steps": "[1, inf)",
    "run.stop_after_steps": "[1, inf)",
}
EXPECTED_RESUMABLE = {
    "data.path",
    "data.val_image_size",  # validation only: evaluate a run at another crop when it resumes
    "data.val_resize_ratio",
    "data.val_interpolation",
    "data.workers",
    "data.dali_py_workers",
    "data.dali_hw_decoder_load",
    "run.resume",
    "run.out_dir",
    "run.log_every_steps",
    "run.stop_after_steps",
    "run.profile_steps",
    "wandb.mode",
    "wandb.tags",
    "wandb.log_model",
    "tensorboard.enabled",
    "dist.timeout_min",
    "dist.hang_timeout_min",
    "model.compile",
    "model.compile_backend",
    "model.compile_mode",
    "model.cudnn_benchmark",
    "model.init_from",  # read only when a run starts fresh
    "model.init_from_ema",
}


def test_ranges_and_resumable_keys_are_read_off_the_fields():
    from dist_bot.config import ranges, resumable_keys

    assert ranges() == EXPECTED_RANGES
    assert resumable_keys() == EXPECTED_RESUMABLE
    keys = set(all_keys())
    assert set(ranges()) <= keys and resumable_keys() <= keys
    for key, interval in ranges().items():  # each interval is one the check can read: "[lo, hi)" with lo <= hi
        lo, hi = (float(x) for x in interval[1:-1].split(","))
        assert interval[0] in "[(" and interval[-1] in ")]" and lo <= hi, key


def test_a_range_comes_from_its_field_and_names_it_in_the_error():
    # num_classes=0 is refused by the field's own param(range="[1, inf)"); a key without a range takes any number
    with pytest.raises(ConfigError, match=r"^model\.num_classes=0 is out of range: it must lie in \[1, inf\)$"):
        load_config(None, ["model.num_classes=0"])
    assert load_config(None, ["data.mean=[-5.0,0.0,99.0]"]).data.mean == (-5.0, 0.0, 99.0)


def test_recipes_that_come_with_dist_bot_load_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the names resolve to the recipes shipped with dist_bot
    by_name = load_config("resnet50d_bs1024")
    assert by_name == load_config(REPO / "configs" / "resnet50d_bs1024.yaml")
    assert by_name.run.name == "resnet50d_bs1024"
    cosine = load_config("configs/paper_ladder/3_cosine.yaml")  # a README command's path; its base chain resolves
    assert cosine.schedule.decay == "cosine" and cosine == load_config(REPO / "configs/paper_ladder/3_cosine.yaml")
    write(tmp_path / "demo.yaml", "schedule: {epochs: 7}\n")  # a file of that name here wins over the bundled one
    assert load_config("demo.yaml").schedule.epochs == 7
    with pytest.raises(ConfigError, match=r"recipe .*resnet51d\.yaml does not exist .* e\.g\. resnet50d_bs1024\)$"):
        load_config("resnet51d.yaml")
