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
    with pytest.raises(ConfigError, match=r"serving: unknown key; allowed keys: project, tracking, model, ingest"):
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
