from pathlib import Path

import pytest

from doctune.config import ConfigError, build_config, config_from_yaml, load_config

REPO = Path(__file__).resolve().parents[1]


def test_default_yaml_documents_exactly_the_defaults():
    assert load_config(REPO / "configs" / "default.yaml") == load_config(None)


def test_set_overrides_parse_values_as_yaml():
    cfg = load_config(None, ["ingest.chunking.size=256", "ingest.ocr=never", "tracking.reuse_stage_results=false"])
    assert cfg.ingest.chunking.size == 256
    assert cfg.ingest.ocr == "never"
    assert cfg.tracking.reuse_stage_results is False


def test_relative_paths_are_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["ingest.pdfs=docs"])
    assert cfg.ingest.pdfs == tmp_path / "docs"
    assert cfg.project.workdir == tmp_path / ".doctune"


def test_unknown_key_names_its_path_and_the_allowed_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["ingest.chunking.sise=10"])
    message = str(err.value)
    assert "ingest.chunking.sise: unknown key" in message
    assert "allowed keys: mode, size, overlap, min_tokens" in message


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match=r"serving: unknown key; allowed keys: task, project, tracking, model, ingest"):
        build_config({"serving": {"port": 1}})


def test_bad_choice_lists_the_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["ingest.ocr=sometimes"])
    assert "ingest.ocr" in str(err.value)
    assert "'auto', 'always' or 'never'" in str(err.value)


def test_overlap_must_stay_below_size():
    with pytest.raises(ConfigError, match=r"ingest.chunking: overlap \(64\) must be smaller than size \(64\)"):
        load_config(None, ["ingest.chunking.size=64", "ingest.chunking.overlap=64"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"ingest.workers: .*integer"):
        load_config(None, ["ingest.workers=many"])


@pytest.mark.parametrize("bad", ["ingest.ocr", "=3", "ingest..ocr=auto"])
def test_malformed_set_is_explained(bad):
    with pytest.raises(ConfigError, match="--set"):
        load_config(None, [bad])


def test_yaml_file_errors_name_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("- a list\n- not sections\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_through_yaml_text_keeps_config_and_digest():
    cfg = load_config(None, ["ingest.chunking.mode=tokens"])
    again = config_from_yaml(cfg.to_yaml())
    assert again == cfg
    assert again.digest() == cfg.digest()
    assert cfg.digest(("ingest",)) != load_config(None).digest(("ingest",))
    assert cfg.digest(("model",)) == load_config(None).digest(("model",))


# -- generated reference --------------------------------------------------------------------------------------------


def test_generated_default_yaml_and_reference_page_are_fresh():
    from doctune.config.reference import outputs

    for relative, text in outputs().items():
        path = REPO / relative
        assert path.is_file() and path.read_text() == text, f"{relative} is stale: run `make config-docs`"


def test_every_key_has_a_description():
    from pydantic import BaseModel

    from doctune.config import RunConfig

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, f"{prefix}{name}.")

    walk(RunConfig, "")


# -- profiles -------------------------------------------------------------------------------------------------------


def test_library_defaults_train_by_epochs_and_the_cpu_demo_by_steps():
    defaults, demo = load_config(None), load_config(REPO / "configs" / "cpu-demo.yaml")
    assert (defaults.cpt.max_steps, defaults.sft.max_steps, defaults.dpo.max_steps) == (0, 0, 0)
    assert not any("package" in prompt for prompt in defaults.merge.verify_prompts)
    assert (demo.cpt.max_steps, demo.sft.max_steps, demo.dpo.max_steps) == (32, 80, 8)
    assert (demo.sft.learning_rate, demo.dpo.learning_rate) == (1e-3, 5e-4)
    assert demo.model.base_model == "bundled:smollm2-135m-instruct"


def test_tiny_profile_extends_the_cpu_demo():
    tiny, demo = load_config(REPO / "configs" / "tiny.yaml"), load_config(REPO / "configs" / "cpu-demo.yaml")
    assert tiny.model.base_model == "bundled:tiny-random" and tiny.sft.max_steps == 4
    assert tiny.sft.learning_rate == demo.sft.learning_rate and tiny.merge.verify_prompts == demo.merge.verify_prompts
    assert tiny.gate.rules.permutations == 1000 and tiny.gate.rules.alpha == demo.gate.rules.alpha


def test_extends_resolves_against_the_file_and_merges_sections(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "base.yaml").write_text(
        "sft: {max_steps: 7, eval_steps: 7, save_steps: 7}\nquantize: {variants: [gguf-f16, nf4], eval_blocks: 3}\n"
    )
    (tmp_path / "run.yaml").write_text("extends: base/base.yaml\nsft: {max_steps: 9}\nquantize: {variants: [nf4]}\n")
    cfg = load_config(tmp_path / "run.yaml", ["sft.eval_steps=1"])
    assert (cfg.sft.max_steps, cfg.sft.save_steps, cfg.sft.eval_steps) == (9, 7, 1)  # mappings merge key by key
    assert cfg.quantize.variants == ["nf4"] and cfg.quantize.eval_blocks == 3  # lists replace


def test_extends_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="circle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_config(tmp_path / "c.yaml")


# -- renamed keys ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "value", "read"),
    [
        ("cpt.eval_fraction", "synth.heldout_fraction", 0.2, lambda c: c.synth.heldout_fraction),
        ("sft.lr_scheduler", "sft.lr_scheduler_type", "linear", lambda c: c.sft.lr_scheduler_type),
        ("dpo.lr_scheduler", "dpo.lr_scheduler_type", "constant_with_warmup", lambda c: c.dpo.lr_scheduler_type),
    ],
)
def test_renamed_key_still_works_with_a_warning_naming_the_new_key(tmp_path, caplog, old, new, value, read):
    section, key = old.split(".")
    path = tmp_path / "run.yaml"
    path.write_text(f"{section}:\n  {key}: {value}\n")
    with pytest.warns(FutureWarning, match=f"{old} is renamed {new}"):
        cfg = load_config(path)
    assert read(cfg) == value and f"{old} is renamed {new}" in caplog.text
    with pytest.warns(FutureWarning, match=new):
        assert read(load_config(None, [f"{old}={value}"])) == value  # --set takes the old name too
    assert config_from_yaml(cfg.to_yaml()) == cfg  # written back under the new name


def test_renamed_key_set_together_with_its_new_name_is_an_error(tmp_path):
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match="sets both cpt.eval_fraction and synth.heldout_fraction"):
        build_config({"cpt": {"eval_fraction": 0.1}, "synth": {"heldout_fraction": 0.2}})
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match="cpt.lr_scheduler and cpt.lr_scheduler_type"):
        build_config({"cpt": {"lr_scheduler": "linear", "lr_scheduler_type": "cosine"}})
    # A profile that extends one written with the old name may use the new one.
    (tmp_path / "old.yaml").write_text("cpt: {lr_scheduler: linear}\n")
    (tmp_path / "new.yaml").write_text("extends: old.yaml\ncpt: {lr_scheduler_type: constant_with_warmup}\n")
    with pytest.warns(FutureWarning):
        assert load_config(tmp_path / "new.yaml").cpt.lr_scheduler_type == "constant_with_warmup"


# -- further TRL arguments ------------------------------------------------------------------------------------------


def test_trl_arguments_are_accepted_by_their_own_name_and_kept():
    cfg = load_config(None, ["sft.eval_accumulation_steps=3", "dpo.label_smoothing=0.1", "cpt.dataloader_pin_memory=false"])
    assert cfg.sft.model_extra == {"eval_accumulation_steps": 3} and cfg.dpo.model_extra == {"label_smoothing": 0.1}
    again = config_from_yaml(cfg.to_yaml())
    assert again == cfg and again.digest() == cfg.digest()
    assert cfg.digest(("sft",)) != load_config(None).digest(("sft",))


def test_unknown_trl_argument_names_the_key_path_and_the_closest_names():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["sft.eval_acumulation_steps=3"])
    message = str(err.value)
    assert "sft.eval_acumulation_steps: unknown key; did you mean eval_accumulation_steps" in message
    assert "or any field of trl.SFTConfig" in message
    with pytest.raises(ConfigError, match=r"cpt.packing: unknown key; .*any field of transformers.TrainingArguments"):
        load_config(None, ["cpt.packing=true"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("sft.num_train_epochs=3", "sft.num_train_epochs: doctune sets num_train_epochs from sft.epochs"),
        ("dpo.per_device_train_batch_size=8", "doctune sets per_device_train_batch_size from dpo.batch_size"),
        ("cpt.output_dir=/tmp/x", "cpt.output_dir: doctune sets output_dir from project.workdir"),
        ("dpo.precompute_ref_log_probs=true", "from dpo.reference"),
        ("sft.use_cpu=true", "sft.use_cpu: doctune sets use_cpu itself"),
    ],
)
def test_trl_arguments_doctune_sets_itself_are_refused_naming_its_key(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("stage", "class_name", "extra"),
    [
        ("sft", "SFTConfig", {"eval_accumulation_steps": 3, "dataloader_pin_memory": False}),
        ("dpo", "DPOConfig", {"label_smoothing": 0.1}),
        ("cpt", "TrainingArguments", {"dataloader_pin_memory": False}),
    ],
)
def test_trl_argument_in_the_run_config_reaches_the_trainer_arguments(tmp_path, stage, class_name, extra):
    """The args object the stage's trainer is built with (doctune.train.recipes) carries the extra argument."""
    import importlib

    from doctune.train.core import TrainJob, default_learning_rate, training_arguments

    cfg = load_config(None, [f"{stage}.{key}={str(value).lower()}" for key, value in extra.items()])
    settings = getattr(cfg, stage)
    job = TrainJob(  # as doctune.train.stage.train_stage builds it
        stage=stage, settings=settings.model_dump(mode="json"), model_dir=str(tmp_path), tokenizer_dir=str(tmp_path),
        data_dir=str(tmp_path), checkpoint_dir=str(tmp_path / "checkpoints"), output_dir=str(tmp_path / "out"),
        learning_rate=settings.learning_rate or default_learning_rate(stage, settings.method),
    )  # fmt: skip
    job = TrainJob.load(job.save(tmp_path / "job.json"))  # as a torchrun worker reads it
    args_class = getattr(importlib.import_module("transformers" if stage == "cpt" else "trl"), class_name)
    args = training_arguments(job, "fp32", args_class)
    for key, value in extra.items():
        assert getattr(args, key) == value
    assert args.num_train_epochs == settings.epochs and args.lr_scheduler_type == settings.lr_scheduler_type
