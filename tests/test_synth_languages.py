"""Documents in several languages: each gets questions in its own language, or a line saying why it got none."""

from __future__ import annotations

import json

import pytest

from doctune.stages import execute_stage
from doctune.synth.languages import LANGUAGES
from doctune.tracking import Tracker

FRENCH_SECTIONS = [
    (
        "Le gestionnaire de paquets",
        [
            "Le gestionnaire de paquets installe les logiciels et leurs dépendances depuis les dépôts configurés.",
            "Un dépôt est un serveur qui publie des paquets signés pour une version de la distribution.",
            "La commande apt-get installe un paquet et tous les paquets dont il dépend.",
            "Le délai d'attente par défaut est 30 secondes pour chaque téléchargement.",
        ],
    ),
    (
        "Les fichiers de configuration",
        [
            "Les fichiers de configuration du système se trouvent dans le répertoire /etc de la machine.",
            "Un fichier de configuration est un texte que l'administrateur modifie avec un éditeur.",
            "La commande dpkg-reconfigure relance les questions posées lors de l'installation d'un paquet.",
            "Remarque : les modifications locales sont conservées lors des mises à jour des paquets.",
        ],
    ),
    (
        "La mise à jour du système",
        [
            "La mise à jour du système remplace les paquets installés par leurs versions les plus récentes.",
            "La commande apt-get upgrade installe les nouvelles versions sans supprimer de paquet.",
            "Le nombre maximal de versions conservées dans le cache est 3 pour chaque paquet.",
            "Une mise à jour est une opération qui peut redémarrer certains services du système.",
        ],
    ),
    (
        "Les utilisateurs et les groupes",
        [
            "Les utilisateurs du système appartiennent à un ou plusieurs groupes qui fixent leurs droits.",
            "La commande adduser crée un compte et son répertoire personnel dans le dossier /home.",
            "Un groupe est un ensemble de comptes qui partagent les mêmes droits sur des fichiers.",
            "La longueur minimale d'un mot de passe est 8 caractères sur une installation standard.",
        ],
    ),
    (
        "Le démarrage de la machine",
        [
            "Le chargeur d'amorçage lit la configuration du noyau puis démarre le système d'initialisation.",
            "Le noyau est le programme qui gère la mémoire, les processus et les périphériques de la machine.",
            "La commande systemctl affiche l'état des services démarrés au lancement du système.",
            "Le délai du menu de démarrage par défaut est 5 secondes avant le choix automatique.",
        ],
    ),
    (
        "Les journaux du système",
        [
            "Les journaux du système enregistrent les messages des services et du noyau au fil du temps.",
            "La commande journalctl affiche les messages enregistrés depuis le dernier démarrage.",
            "Un journal est un fichier où chaque ligne porte la date et l'origine d'un message.",
            "Attention : les anciens journaux sont supprimés quand le disque dépasse sa limite.",
        ],
    ),
]

JAPANESE = (
    "パッケージマネージャーは、設定されたリポジトリからソフトウェアとその依存関係をインストールします。"
    "リポジトリは、ディストリビューションの各バージョン向けに署名されたパッケージを公開するサーバーです。"
) * 6


def _pdf(path, pages: list[tuple[str, list[str]]], fontname: str = "helv") -> None:
    import pymupdf

    document = pymupdf.open()
    for number, (title, paragraphs) in enumerate(pages, 1):
        page = document.new_page()
        text = f"{number}. {title}\n\n" + "\n\n".join(paragraphs)
        page.insert_textbox(pymupdf.Rect(50, 50, 545, 800), text, fontsize=11, fontname=fontname)
    # The same bytes every time (no dates, no new file id): the document digest, hence its chunk ids and the
    # seeded split, do not change from one test session to the next.
    document.set_metadata({"creationDate": "D:20260101000000Z", "modDate": "D:20260101000000Z"})
    document.save(path, no_new_id=True)


@pytest.fixture(scope="module")
def multilingual(tmp_path_factory, tiny_model_dir):
    from doctune.config import build_config

    folder = tmp_path_factory.mktemp("multilingual-pdfs")
    _pdf(folder / "guide.fr.pdf", FRENCH_SECTIONS * 2)
    _pdf(folder / "guide.ja.pdf", [("パッケージ", [JAPANESE])] * 3, fontname="japan")
    work = tmp_path_factory.mktemp("multilingual-work")
    config = build_config(
        {"project": {"workdir": str(work)}, "model": {"base_model": str(tiny_model_dir)}, "ingest": {"pdfs": str(folder)},
         "synth": {"replay": {"share": 0.0, "sft_share": 0.0}, "min_golden": 12}}
    )  # fmt: skip
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("languages")
    ingest = execute_stage("ingest", config, tracker, parent, {})
    synth = execute_stage(
        "synth", config, tracker, parent, {"chunks": ingest.outputs["chunks"], "pages": ingest.outputs["pages"]}
    )
    report = json.loads((tracker.fetch(synth.outputs["report"]) / "synth_report.json").read_text())
    return tracker, synth, report


def test_a_french_document_yields_french_questions_and_answers(multilingual):
    from langdetect import DetectorFactory, detect

    tracker, synth, report = multilingual
    DetectorFactory.seed = 0
    raw = [json.loads(line) for line in (tracker.fetch(synth.outputs["raw"]) / "qa.jsonl").read_text().splitlines()]
    french = [q for q in raw if q["meta"].get("lang") == "fr"]
    assert len(french) >= 10
    starts = {" ".join(p.split()[:2]) for t in LANGUAGES["fr"].templates.values() for p in t}  # before any contraction
    assert all(any(q["question"].startswith(s) for s in starts) for q in french)
    assert sum(detect(q["answer"]) == "fr" for q in french) >= 0.9 * len(french)
    row = next(r for r in report["documents"] if r["source"] == "guide.fr.pdf")
    assert row["lang"] == "fr" and row["kept"] > 0 and not row["reason"]


def test_a_japanese_document_is_reported_with_the_reason(multilingual):
    _, _, report = multilingual
    row = next(r for r in report["documents"] if r["source"] == "guide.ja.pdf")
    assert row["lang"] == "ja" and row["generated"] == 0
    assert "no question templates for Japanese" in row["reason"]


def test_languages_the_embedding_model_misses_are_searched_hybrid(multilingual):
    _, _, report = multilingual
    assert report["retrieval"]["mode"] == "hybrid" and "covers en only" in report["retrieval"]["why"]


def test_abstentions_decline_in_the_language_of_their_passages(multilingual):
    from doctune.chat import ABSTENTIONS

    tracker, synth, _ = multilingual
    sft_dir, unanswerable_dir = tracker.fetch(synth.outputs["sft"]), tracker.fetch(synth.outputs["unanswerable"])
    sft = [json.loads(line) for name in ("train.jsonl", "validation.jsonl") for line in (sft_dir / name).read_text().splitlines()]
    abstaining = [r["messages"][-1]["content"] for r in sft if r["meta"]["form"] == "abstention"]
    unanswerable = [json.loads(line)["answer"] for line in (unanswerable_dir / "unanswerable.jsonl").read_text().splitlines()]
    # Every passage here is French (the Japanese document gave none): a French reader is told in French.
    assert abstaining and set(abstaining) == {ABSTENTIONS["fr"]}
    assert unanswerable and set(unanswerable) == {ABSTENTIONS["fr"]}
    # The sentences travel with the datasets, so the gate and serving score and reply with the same ones.
    assert json.loads((unanswerable_dir / "abstentions.json").read_text()) == ABSTENTIONS
