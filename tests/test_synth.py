"""Synthetic data: the extractive teacher, filters, leak-free datasets on the real corpus, endpoint teachers."""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from doctune.chat import ABSTENTION, SYSTEM_PROMPT, edge_order
from doctune.config import EndpointConfig, SynthConfig
from doctune.endpoint import EndpointError
from doctune.records import read_parquet
from doctune.stages import execute_stage
from doctune.synth import filters
from doctune.synth.build import (
    Builder,
    alter,
    assign_splits,
    judged,
    rehearsal_records,
    replay_records,
    section_in_context,
    subject_named,
)
from doctune.synth.extractive import QA, extractive_questions, fold, leans_on_context, name_sections
from doctune.synth.languages import LANGUAGES, TYPES
from doctune.synth.replay import ReplayText
from doctune.synth.stage import SynthError
from doctune.synth.teachers import EndpointTeacher, generate
from doctune.tracking import Tracker

CHUNK = {
    "chunk_id": "doc-0001",
    "doc_id": "doc",
    "section": "8.1 Box plots",
    "text": (
        "8.1 Box plots\n\n"
        "A box plot is a graph that shows the median and the quartiles of a data set.\n"
        "The draw command draws the box plot on the current axes.\n"
        "The default whisker length is 1.5 inter-quartile ranges.\n\n"
        "The following options are available:\n"
        "-u graylevel -- set graylevel for underlay beneath panels.\n"
        "-h -- print this help message and quit.\n\n"
        "To draw a box plot with whiskers:\n"
        "1. Read the data columns with the read command.\n"
        "2. Set the whisker length with the set command.\n"
        "3. Draw the box plot with the draw command.\n\n"
        "Note: Missing values are skipped when the quartiles are computed.\n"
    ),
}

FRENCH_CHUNK = {
    "chunk_id": "doc-fr-0001",
    "doc_id": "doc-fr",
    "lang": "fr",
    "section": "3.2 Le gestionnaire de paquets",
    "text": (
        "3.2 Le gestionnaire de paquets\n\n"
        "Le gestionnaire de paquets installe les logiciels et leurs dépendances depuis les dépôts configurés.\n"
        "Un dépôt est un serveur qui publie des paquets signés pour une version de la distribution.\n"
        "La commande apt-get installe un paquet et les paquets dont il dépend.\n"
        "Le délai d'attente par défaut est 30 secondes pour chaque téléchargement.\n"
    ),
}


def test_every_question_type_has_five_phrasings_in_every_language():
    for lang in LANGUAGES.values():
        assert set(lang.templates) == set(TYPES), lang.code
        assert all(len(set(t)) == 5 for t in lang.templates.values()), lang.code


def test_extractive_answers_are_spans_of_the_chunk_and_sentences_not_numbers():
    qas = extractive_questions(CHUNK, limit=16)
    kinds = Counter(qa.qtype for qa in qas)
    assert {"definition", "reference", "procedure", "numeric", "note", "section"} <= set(kinds), kinds
    for qa in qas:
        assert fold(CHUNK["text"][qa.answer_start : qa.answer_end]) == fold(qa.answer), qa
        assert len(qa.answer.split()) >= 3 and "___" not in qa.question, qa
    numeric = next(qa for qa in qas if qa.qtype == "numeric")
    assert numeric.question.endswith("the default whisker length?") or "the default whisker length" in numeric.question
    assert numeric.answer == "The default whisker length is 1.5 inter-quartile ranges."  # says what the number is
    assert any("-u graylevel option" in qa.question for qa in qas)
    note = next(qa for qa in qas if qa.qtype == "note")
    assert '"Box plots"' in note.question and note.answer.startswith("Missing values are skipped")
    assert extractive_questions(CHUNK, limit=16) == qas  # deterministic


def test_french_chunks_get_french_questions_and_unknown_languages_none():
    qas = extractive_questions(FRENCH_CHUNK, limit=16)
    french = {" ".join(p.split()[:2]) for t in LANGUAGES["fr"].templates.values() for p in t}  # before any contraction
    assert qas and all(any(qa.question.startswith(start) for start in french) for qa in qas)
    assert {"definition", "reference", "numeric"} <= {qa.qtype for qa in qas}
    assert all(" de le " not in qa.question and " de les " not in qa.question for qa in qas)  # contracted: du, des
    assert extractive_questions({**FRENCH_CHUNK, "lang": "ja"}, limit=16) == []


def test_questions_never_stand_on_a_pronoun_or_a_generic_title():
    chunk = {
        "chunk_id": "c", "doc_id": "d", "section": "Example 2",
        "text": "Example 2\n\nIt is a tool that draws graphs of any data set you give it.\n"
                "This is a command that prints the version of the program.\n",
    }  # fmt: skip
    assert extractive_questions(chunk, limit=16) == []
    items = [_qa("What does it do?", "It draws graphs of any data."), _qa("Fill in: <xsl:param name=___>", "The depth is 8.")]
    items.append(_qa("What does the draw command do?", "8"))
    assert filters.self_contained_filter(items) == [items[2]]
    assert filters.answer_form_filter(items) == items[:2]


def test_a_title_many_sections_share_is_asked_with_its_parent_heading():
    def chunk(n, section, parent, body, doc="fhs", title="Filesystem Hierarchy Standard"):
        text = f"{section}\n\n{body}\n"
        return {"chunk_id": f"{doc}-{n}", "doc_id": doc, "title": title, "lang": "en", "section": section,
                "section_parent": parent, "text": text}  # fmt: skip

    lead = "holds the commands that every user of the system may run, before any other filesystem is mounted."
    chunks = name_sections([
        chunk(1, "3.4.1. Purpose", "3.4. /bin : Essential user command binaries", f"This directory {lead}"),
        chunk(2, "3.16.1. Purpose", "3.16. /sbin : System binaries", f"This directory also {lead}"),
        chunk(3, "3.17.1. Purpose", "", f"The directory {lead}"),  # its parent heading is unknown
        chunk(4, "3.18. Mount points", "Chapter 3. The Root Filesystem", f"The directory {lead}"),
        chunk(5, "Purpose", "", f"The guide {lead}", doc="guide", title="Packaging Guide"),
        # Two editions of one standard: neither the parent nor the title alone tells their /boot sections apart.
        chunk(6, "3.5.1. Purpose", "3.5. /boot : Boot loader files", f"It {lead}", doc="fhs22", title="FHS 2.2"),
        chunk(7, "3.5.1. Purpose", "3.5. /boot : Boot loader files", f"It {lead}", doc="fhs23", title="FHS 2.3"),
        chunk(8, "3.6.1. Purpose", "3.6. /dev : Devices", f"It {lead}", doc="fhs23", title="FHS 2.3"),
        # Two documents titled alike: the title cannot tell their sections apart.
        chunk(9, "Options", "", f"It {lead}", doc="um1", title="User Manual"),
        chunk(10, "Options", "", f"It {lead}", doc="um2", title="User Manual"),
    ])  # fmt: skip
    named = [c["section_named"] for c in chunks]
    assert named == [
        "/bin : Essential user command binaries › Purpose", "/sbin : System binaries › Purpose",
        "", "Mount points", "Packaging Guide › Purpose",  # no parent: the document tells it apart
        "FHS 2.2 › Purpose", "FHS 2.3 › /boot : Boot loader files › Purpose",  # 2.3 has two: its title is not enough
        "/dev : Devices › Purpose", "", "",
    ]  # fmt: skip
    section_questions = [qa.question for qa in extractive_questions(chunks[0], limit=16) if qa.qtype == "section"]
    assert section_questions and all('"/bin : Essential user command binaries › Purpose"' in q for q in section_questions)
    assert not [qa for qa in extractive_questions(chunks[2], limit=16) if qa.qtype in ("section", "topic")]
    wrapped = chunk(11, "3.13. /opt : Add-on application software packages", "", "The /opt tree is reserved for add-ons.")
    wrapped["text"] = wrapped["text"].replace("software packages", "software\npackages", 1)  # as the page wraps it
    assert [qa.qtype for qa in extractive_questions(wrapped, limit=16)] == ["section"]


def test_a_sentence_that_leans_on_the_one_before_is_no_topic_answer():
    chunk = {
        "chunk_id": "c", "doc_id": "d", "lang": "es", "section": "5.2 Archivo watch",
        "text": "5.2 Archivo watch\n\nAhora que el archivo watch existe, uscan lo lee.\n\n"
                "Usa el comando cp para copiar el archivo watch al directorio del paquete antes de compilar.\n",
    }  # fmt: skip
    untitled = {"chunk_id": "e", "doc_id": "d", "lang": "en", "section": "", "text": (
        "The files that belong to a package are listed in the package manifest.\n"
        "The locations specified here may be symbolic links to other places on the disk.\n"
    )}  # fmt: skip
    facts = [qa.question for qa in extractive_questions(untitled, limit=16) if qa.qtype == "fact"]
    assert len(facts) == 1 and "the files that belong to a package" in facts[0]  # "here": which locations?
    topics = [qa for qa in extractive_questions(chunk, limit=16) if qa.qtype == "topic"]
    assert [qa.answer for qa in topics] == [
        "Usa el comando cp para copiar el archivo watch al directorio del paquete antes de compilar."
    ]
    # A pronoun that points at nothing is no reason to refuse a sentence.
    languages = {code: LANGUAGES[code] for code in ("en", "fr", "de")}
    assert leans_on_context("It must be two characters wide.", languages["en"])
    assert not leans_on_context("It is recommended to make backups before an upgrade.", languages["en"])
    assert not leans_on_context("Il faut d’abord installer le paquet.", languages["fr"])
    assert leans_on_context("C’est la valeur par défaut.", languages["fr"])
    assert not leans_on_context("Es gibt zwei Arten von Paketquellen.", languages["de"])
    assert not leans_on_context("Damit Paketquellen genutzt werden können, muss apt laufen.", languages["de"])


def test_a_fact_subject_ends_where_its_verb_begins_and_names_a_thing():
    def subjects(lang: str, *sentences: str) -> list[str]:
        chunk = {"chunk_id": "c", "doc_id": "d", "lang": lang, "section": "", "text": "\n".join(sentences) + "\n"}
        return [qa.meta["fields"]["subject"] for qa in extractive_questions(chunk, limit=16) if qa.qtype == "fact"]

    # A negation, a clitic or an adverb sits between the subject and its verb: the subject ends before it.
    assert subjects("es", "El empaquetado no es tan complicado como puede parecer a primera vista.") == ["el empaquetado"]
    assert subjects("es", "La presencia del archivo CMakeLists.txt te indicará que se utiliza CMake para compilar.") == [
        "la presencia del archivo CMakeLists.txt"
    ]
    assert subjects("fr", "Le gestionnaire de paquets n'installe jamais un paquet sans sa signature valide.") == [
        "le gestionnaire de paquets"
    ]
    assert subjects("en", "The upgrade command also removes the packages that are no longer needed.") == ["the upgrade command"]
    # A subject cut inside its clause, or one that is a place in a listing, names nothing a reader can look up.
    # A relative clause is read to its end; a noun, a variable name or a name in capitals is no word between.
    assert subjects("es", "Una de las cosas que puede hacer el desarrollador es leer la documentación.") == [
        "una de las cosas que puede hacer el desarrollador"
    ]
    assert subjects("en", "The read only flag is set on the mount point by the installer.") == ["the read only flag"]
    assert subjects("fr", "La variable y contient la hauteur de la fenêtre en pixels.") == ["la variable y"]
    assert subjects("es", "El soporte de Mac OS X es limitado en esta versión del programa.") == ["el soporte de Mac OS X"]
    assert subjects("es", "La línea 3 describe cómo de importante es el paquete para el sistema.") == []
    assert subjects("en", "The naming convention which can be found in the policy manual is used by every package.") == []
    assert subjects("es", "Las breves descripciones dadas anteriormente deben ser revisadas por el desarrollador.") == []


def _qa(question, answer, chunk="c1"):
    return QA(question=question, answer=answer, chunk_id=chunk, qtype="generated", evidence=answer)


def test_an_answer_in_another_language_than_its_question_is_dropped():
    from doctune.langid import language_probabilities

    items = [
        _qa("¿Qué dice la sección «Archivo watch»?", "The watch file format is documented in the uscan manual page.", "es1"),
        _qa("¿Qué dice la sección «Archivo rules»?", "El archivo rules contiene las reglas que usa dpkg-buildpackage.", "es2"),
        _qa("¿Qué es dh_make?", "Véase dh_make(1).", "es3"),  # too short to tell: kept
        _qa("What does the FHS say about /opt?", "Add-on application software packages are installed in /opt.", "en1"),
    ]
    # Names and field names are no prose in another language: the detector is sure of English, they hold no "the".
    items.append(
        _qa("¿Qué campos tiene el archivo control?", "Source, Section, Priority, Maintainer, Build-Depends, Homepage", "es4")
    )
    items.append(_qa("Welche Dokumente nennt das Handbuch?", "Debian Free Software Guidelines (DFSG), Social Contract", "de1"))
    lang_of = {"es1": "es", "es2": "es", "es3": "es", "es4": "es", "en1": "en", "de1": "de"}
    function_words = {code: lang.function_words for code, lang in LANGUAGES.items()}
    kept = filters.answer_language_filter(items, lang_of.get, language_probabilities, function_words)
    assert kept == items[1:]


def test_filters_drop_what_they_should():
    items = [
        _qa("What is a box plot?", "A graph of quartiles."),
        _qa("what is a BOX plot", "a graph of quartiles"),  # exact duplicate once normalized
        _qa("Which value is 42 here?", "42"),  # leaks its answer
        _qa("Describe the median line position.", "It marks the middle of the box."),
    ]
    assert [q.answer for q in filters.exact_dedup(items)] == ["A graph of quartiles.", "42", "It marks the middle of the box."]
    assert [q.answer for q in filters.leakage_filter(items)] == [
        "A graph of quartiles.",
        "a graph of quartiles",
        "It marks the middle of the box.",
    ]
    near = [
        _qa("What does the draw box command draw on the axes?", "A box."),
        _qa("What does the draw box command draw on the axis?", "A box."),
    ]
    assert len(filters.minhash_dedup(near, threshold=0.5, permutations=64)) == 1
    assert (
        filters.length_filter([_qa("Question one here?", "cut off..."), _qa("Question two here?", "Fine.")])[0].answer == "Fine."
    )


def test_embedding_dedup_finds_near_duplicates_only():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((50, 16)).astype(np.float32)
    near = base[:10] + 0.01 * rng.standard_normal((10, 16)).astype(np.float32)
    vectors = np.vstack([base, near])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = [_qa(f"question {i}?", f"answer {i}") for i in range(60)]
    kept = filters.embedding_dedup(items, vectors, threshold=0.99)
    assert [q.question for q in kept] == [f"question {i}?" for i in range(50)]


def test_edge_order_puts_the_best_passages_at_both_ends():
    assert edge_order(["r1", "r2", "r3", "r4", "r5"]) == ["r1", "r3", "r5", "r4", "r2"]


def test_altered_answers_change_a_number_or_a_name():
    assert alter("Whiskers extend 1.5 ranges.", [], 0.0) != "Whiskers extend 1.5 ranges."
    assert alter("It was written by Tukey in 1977.", ["Barnes"], 0.0) == "It was written by Tukey in 1978."
    assert alter("Invented by Tukey for data.", ["Barnes", "Tukey"], 0.0) == "Invented by Barnes for data."
    assert alter("no numbers or names here", ["Barnes"], 0.5) is None


def test_replay_reaches_its_share_by_repeating_whole_texts():
    counts = Counter()
    records = replay_records([ReplayText("a" * 100), ReplayText("b" * 100)], domain_chars=1600, share=0.2, counts=counts)
    replay_chars = sum(len(r["text"]) for r in records)
    assert 400 <= replay_chars < 500 and counts["replay_repeats"] == 2
    assert replay_records([ReplayText("x")], 100, 0.0, Counter()) == []


def test_rehearsal_replies_join_sft_as_chats_without_the_documentation_prompt():
    texts = [ReplayText.rehearsal(f"Question {i}?", f"Reply {i}.\n\nMore of reply {i}.") for i in range(50)]
    texts.append(ReplayText("No reply here"))  # a replay dataset's text: not a chat
    counts = Counter()
    chats = rehearsal_records(texts, 0.1, 180, counts)
    assert len(chats) == counts["sft_rehearsal"] == 20  # 10% of 200 examples
    assert chats[3]["messages"] == [{"role": "user", "content": "Question 3?"},
                                    {"role": "assistant", "content": "Reply 3.\n\nMore of reply 3."}]  # fmt: skip
    assert all(c["meta"]["form"] == "rehearsal" for c in chats)
    assert rehearsal_records(texts, 0.0, 180, Counter()) == []
    assert len(rehearsal_records(texts, 0.4, 1000, Counter())) == 50  # never more than there are replies


def test_an_open_question_whose_subject_the_context_names_is_no_abstention_case():
    def qa(qtype: str, template: int, lang: str = "en", **fields) -> QA:
        question = LANGUAGES[lang].templates[qtype][template].format(**{"title": "Install", **fields})
        return QA(question, "withheld.", "c-1", qtype, template, meta={"fields": {"title": "Install", **fields}, "lang": lang})

    about_groups = qa("topic", 1, title="Groups of questions")
    assert subject_named(about_groups, ["Other text.", "Each group holds several questions, shuffled per sheet."])
    assert not subject_named(about_groups, ["The answer sheet is scanned.", "Questions are numbered."])  # no "group"
    teacher = qa("fact", 2, subject="the teacher")
    assert subject_named(teacher, ["The teachers mark the sheets."])
    assert not subject_named(teacher, ["Sheets are marked by hand."])
    # A fact question is about its subject, not its section: the section's words alone do not answer it.
    lock = qa("fact", 4, title="Installing packages", subject="the lock file")
    assert not subject_named(lock, ["To install several packages, list them."])
    assert not subject_named(qa("topic", 0, title="Process"), ["The procedure has three steps."])  # stems differ
    # French: the question contracts "de le" to "du"; the subject is still found.
    fichier = qa("fact", 0, lang="fr", subject="le fichier de configuration")
    assert subject_named(fichier, ["Le fichier de configuration se trouve dans /etc."])
    # A question about a specific fact stays an abstention case when its subject is in context and the fact is not.
    depth = qa("numeric", 0, subject="the default maximal depth of the table of contents")
    assert not subject_named(depth, ["The default maximal depth of the table of contents is set per style."])
    assert not subject_named(QA("Q about groups?", "a", "c-1", "topic"), ["groups"])  # an LLM teacher's item: no fields
    # A subject of short words is found as a phrase: "help" in "Type help to list the commands".
    helping = qa("topic", 0, title="help")
    assert subject_named(helping, ["Online Help. Type help to get a list of commands."])
    assert not subject_named(helping, ["A whelp.", "The helpers."])
    assert not subject_named(qa("topic", 0, title="draw y axis"), ["9.3.9.35 draw x axis: draws an axis."])
    assert not subject_named(qa("fact", 2, subject="the f.h file"), ["ls: list files."])
    assert subject_named(qa("fact", 2, subject="the f.h file"), ["The f.h file is generated."])
    assert subject_named(qa("fact", 2, subject="the directory name"), ["Directory names are lower case."])  # "name" not needed
    assert not subject_named(qa("topic", 0, title="C++ API"), ["The C++ API of the library."])  # no word to find


def test_a_title_question_over_a_passage_of_its_own_section_is_no_abstention_case():
    def chunk(section: str, parent: str = "", doc: str = "fhs") -> dict:
        return {"doc_id": doc, "section": section, "section_parent": parent, "text": "..."}

    def asking(qtype: str, template: int, title: str, lang: str = "en", **fields) -> QA:
        question = LANGUAGES[lang].templates[qtype][template].format(title=title, **fields)
        return QA(question, "withheld.", "c-1", qtype, template, meta={"fields": {"title": title, **fields}, "lang": lang})

    media = "3.11. /media : Mount point for removable media"
    source = chunk("3.11.1. Purpose", media)
    purpose = asking("section", 0, "/media : Mount point for removable media › Purpose")
    # Named with its parent: the parent's other subsections are about the same subject.
    mnt = chunk("3.12.1. Purpose", "3.12. /mnt : Mount point")
    assert section_in_context(purpose, source, [mnt, chunk("3.11.2. Specific Options", media)])
    assert section_in_context(purpose, source, [chunk(media, "Chapter 3. The Root Filesystem")])  # the parent's lead
    assert section_in_context(purpose, source, [chunk("3.11.1. Purpose", media)])  # another chunk of the section
    assert not section_in_context(purpose, source, [mnt])
    assert not section_in_context(purpose, source, [chunk("3.11.2. Specific Options", media, doc="other")])
    # Named alone: its siblings are other subjects ("Archivo control" beside "Archivo compat"), its subsections not.
    parent = "5. Otros ficheros en el directorio debian"
    compat = asking("section", 0, "Archivo compat", lang="es")
    source = chunk("5.2. Archivo compat", parent, doc="guia")
    assert not section_in_context(compat, source, [chunk("5.3. Archivo control", parent, doc="guia")])
    assert section_in_context(compat, source, [chunk("5.2.1. Niveles", "5.2. Archivo compat", doc="guia")])
    # A fact question asks about its subject, whatever section the context is from.
    fact = asking("fact", 4, "Archivo compat", lang="en", subject="the compatibility level")
    assert not section_in_context(fact, source, [chunk("5.2. Archivo compat", parent, doc="guia")])


def test_a_structured_reply_is_cut_after_the_json_object_it_starts_with():
    from doctune.structured import leading_json

    fenced = '```json\n{"make": "Aurora", "year": 2023}\n```\n\nThis is a JSON-formatted representation of a car.'
    assert leading_json(fenced) == ({"make": "Aurora", "year": 2023}, '```json\n{"make": "Aurora", "year": 2023}\n```')
    assert leading_json('{"a": 1} and more') == ({"a": 1}, '{"a": 1}')
    for bad in ('```json\n{"a": 1,}\n```', 'Sure: {"a": 1}', '```json\n{"a": 1}', "[1, 2]"):
        assert leading_json(bad) is None  # invalid, not at the start, an unclosed fence, not an object


def test_verified_structured_replies_take_turns_with_general_ones_at_any_share():
    general = [ReplayText.rehearsal(f"Question {i}?", f"Reply {i}.") for i in range(20)]
    structured = [ReplayText.rehearsal(f"JSON {i}?", '{"name": "x"}', structured=True) for i in range(3)]
    counts = Counter()
    chats = rehearsal_records(general + structured, 0.1, 54, counts)  # 6 chats
    assert [c["messages"][0]["content"] for c in chats] == ["JSON 0?", "Question 0?", "JSON 1?", "Question 1?",
                                                            "JSON 2?", "Question 2?"]  # fmt: skip
    assert counts["sft_rehearsal_structured"] == 3 and counts["sft_rehearsal"] == 6


def test_replay_dataset_errors_name_the_file(tmp_path):
    from doctune.synth.replay import ReplayError, load_replay_dataset

    bad = tmp_path / "replay.jsonl"
    bad.write_text(json.dumps({"body": "no text column"}) + "\n")
    with pytest.raises(ReplayError, match=rf"{bad}: no 'text' column \(columns: body\)"):
        load_replay_dataset(bad)
    with pytest.raises(ReplayError, match="expected an existing .jsonl or .parquet"):
        load_replay_dataset(tmp_path / "missing.csv")


def test_a_model_that_rehearses_nothing_is_an_error(tiny_model_dir, tmp_path):
    from doctune.config import ReplayConfig
    from doctune.synth.replay import ReplayError, rehearsal

    with pytest.raises(ReplayError, match="answered none of 2 rehearsal prompts"):  # greedy: end of turn at once
        rehearsal(str(tiny_model_dir), ReplayConfig(max_new_tokens=8, max_prompts=2, temperature=0), tmp_path, seed=0)


def test_rehearsal_replies_are_sampled_reproducibly_per_seed(tiny_model_dir, tmp_path):
    import torch

    from doctune.config import ReplayConfig
    from doctune.synth.replay import rehearsal

    config = ReplayConfig(max_new_tokens=12, max_prompts=3, batch_size=2)
    state = torch.random.get_rng_state()
    first = rehearsal(str(tiny_model_dir), config, tmp_path / "a", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is left as it was
    assert rehearsal(str(tiny_model_dir), config, tmp_path / "b", seed=1) == first
    assert rehearsal(str(tiny_model_dir), config, tmp_path / "c", seed=2) != first
    assert len(first) == 3  # sampling draws text where greedy decoding of this model ends the turn at once


@pytest.mark.real_model
def test_bundled_model_rehearses_general_prompts(tmp_path):
    from doctune.config import ReplayConfig
    from doctune.structured import json_object, schema_match
    from doctune.synth.replay import format_prompts, general_prompts, rehearsal

    config = ReplayConfig(max_new_tokens=48, max_prompts=4)
    sampled_all = rehearsal("bundled:smollm2-135m-instruct", config, tmp_path, seed=13)
    greedy_all = rehearsal("bundled:smollm2-135m-instruct", config.model_copy(update={"temperature": 0}), tmp_path, seed=13)
    sampled, greedy = [t for t in sampled_all if not t.structured], [t for t in greedy_all if not t.structured]
    assert len(sampled) == len(greedy) == 4 and len(general_prompts()) >= 100
    requests = {r["prompt"]: r["schema"] for r in format_prompts()[:4]}
    structured = [t for t in sampled_all if t.structured]
    assert structured  # the bundled model writes valid JSON for some of the requests within the attempts
    assert all(schema_match(json_object(t.reply, only=True), requests[t.prompt]) for t in structured)
    for prompt, text in zip(general_prompts(), sampled):
        assert text.prompt == prompt and text.text.startswith(prompt + "\n\n") and text.reply.strip()
    assert "scatter" in greedy[0].reply  # "Explain why the sky is blue": the model's most likely answer is Rayleigh's
    assert sampled != greedy


def test_judge_keeps_only_pairs_both_orders_agree_on():
    pair = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"content": "good"}], "rejected": [{"content": "bad"}]}
    consistent = lambda q, a, b: "A" if a == "good" else "B"  # noqa: E731
    positional = lambda q, a, b: "A"  # noqa: E731  (always prefers the first answer shown)
    counts = Counter()
    assert judged([pair], consistent, counts) == [pair]
    assert judged([pair], positional, counts) == [] and counts["judge_disagreed"] == 1


# -- the stage on the real corpus ----------------------------------------------


def ingest_chunks(tracker, synth_result):
    """The chunks of the ingest run in the synth run's pipeline run."""
    parent = tracker.client.get_run(synth_result.run_id).data.tags["mlflow.parentRunId"]
    (ingest,) = tracker.stage_runs(parent, "ingest")
    return tracker.outputs_of(ingest)["chunks"]


def _jsonl(folder: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def test_synth_outputs_every_dataset(corpus_synth):
    _, tracker, result = corpus_synth
    assert set(result.outputs) == {"cpt", "heldout", "sft", "dpo", "golden", "unanswerable", "raw", "report"}
    report = json.loads((tracker.fetch(result.outputs["report"]) / "synth_report.json").read_text())
    sizes = report["datasets"]
    assert sizes["sft_train"] > 150 and sizes["dpo_train"] > 150 and sizes["unanswerable"] > 40
    assert sizes["golden"] >= 100  # eval chunks are added until the gate's tests have items enough
    assert report["filters"]["generated"] > report["filters"]["kept"] > 0
    assert 0.15 <= report["abstention_share"] <= 0.2
    assert 0.19 <= report["replay_share"] <= 0.21  # from the user-supplied general text
    run = tracker.client.get_run(result.run_id)
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["chunks:chunks.parquet"]


def test_training_data_a_person_would_accept(corpus_synth):
    """Questions name their subject and are specific to their passage; answers are sentences, never a bare number."""
    from doctune.retrieval import ChunkIndex
    from doctune.synth.build import Holders

    config, tracker, result = corpus_synth
    folder = tracker.fetch(result.outputs["sft"])
    records = [
        r
        for r in _jsonl(folder, "train.jsonl") + _jsonl(folder, "validation.jsonl")
        if r["meta"]["form"] in ("rag", "closed_book")
    ]
    golden = _jsonl(tracker.fetch(result.outputs["golden"]), "golden.jsonl")
    for question, answer in [(r["meta"]["question"], r["messages"][2]["content"]) for r in records] + [
        (g["question"], g["answer"]) for g in golden
    ]:
        assert len(answer.split()) >= 3 and not answer.replace(".", "").strip().isdigit(), (question, answer)
        assert not filters._PRONOUN_SUBJECT.search(question) and "___" not in question, question
    report = json.loads((tracker.fetch(result.outputs["report"]) / "synth_report.json").read_text())
    types = report["question_types"]
    assert len(types) >= 5 and all(row["kept"] <= row["generated"] for row in types.values())
    assert sum(row["golden"] for row in types.values()) == report["datasets"]["golden"]
    assert report["filters"]["dropped_not_specific"] > 0 and report["retrieval"]["mode"] == "dense"
    # Specificity of what was kept, measured with another retriever than the filter's (hybrid: BM25 + dense).
    chunks = [{**c, "lang": "en"} for c in read_parquet(tracker.fetch(ingest_chunks(tracker, result)) / "chunks.parquet")]
    index = ChunkIndex(
        [c["text"] for c in chunks], config.retrieval.embedding_model, config.project.workdir / "cache", mode="hybrid"
    )
    items = [
        QA(question=g["question"], answer=g["answer"], chunk_id=g["chunk_ids"][0], qtype="", evidence=g["meta"]["evidence"])
        for g in golden
    ]
    ranked = index.search([qa.question for qa in items], 5)[0].tolist()
    assert sum(filters.specific(items, ranked, Holders(chunks))) / len(items) >= 0.8
    # Documents that gave nothing say why.
    empty = [row for row in report["documents"] if not row["kept"]]
    assert all(row["reason"] for row in empty)


def test_eval_sets_are_leak_free(corpus_synth):
    _, tracker, result = corpus_synth
    sft = _jsonl(tracker.fetch(result.outputs["sft"]), "train.jsonl") + _jsonl(
        tracker.fetch(result.outputs["sft"]), "validation.jsonl"
    )
    golden = _jsonl(tracker.fetch(result.outputs["golden"]), "golden.jsonl")
    unanswerable = _jsonl(tracker.fetch(result.outputs["unanswerable"]), "unanswerable.jsonl")
    eval_chunks = {c for item in golden + unanswerable for c in item["chunk_ids"]}
    training_chunks = {r["meta"]["chunk_id"] for r in sft} | {c for r in sft for c in r["meta"].get("context_chunk_ids", [])}
    assert eval_chunks and not eval_chunks & training_chunks
    cpt = _jsonl(tracker.fetch(result.outputs["cpt"]), "train.jsonl")
    heldout = _jsonl(tracker.fetch(result.outputs["heldout"]), "heldout.jsonl")
    assert heldout and not {r["text"] for r in heldout} & {r["text"] for r in cpt}  # no training stage sees it
    chunks = read_parquet(tracker.fetch(ingest_chunks(tracker, result)) / "chunks.parquet")
    held_ids = {c["chunk_id"] for c in chunks if c["text"] in {r["text"] for r in heldout}}
    assert held_ids and not held_ids & training_chunks  # not as SFT/DPO questions or contexts either
    assert not [
        g for g in golden if len(g["meta"]["evidence"]) > 40 and any(g["meta"]["evidence"] in fold(r["text"]) for r in cpt)
    ]
    report = json.loads((tracker.fetch(result.outputs["report"]) / "synth_report.json").read_text())
    assert report["contamination_rate"] == 0.0
    assert all(item["answerable"] for item in golden) and not any(item["answerable"] for item in unanswerable)
    assert all(item["answer"] == ABSTENTION for item in unanswerable)


def test_the_source_chunk_is_in_every_answerable_context(corpus_synth):
    config, tracker, result = corpus_synth
    sft = _jsonl(tracker.fetch(result.outputs["sft"]), "train.jsonl")
    golden = _jsonl(tracker.fetch(result.outputs["golden"]), "golden.jsonl")
    contexts = [(r["meta"]["chunk_id"], r["meta"]["context_chunk_ids"]) for r in sft if r["meta"]["form"] == "rag"]
    contexts += [(g["chunk_ids"][0], g["meta"]["context_chunk_ids"]) for g in golden]
    assert contexts and all(chunk in ids and len(ids) == config.retrieval.top_k for chunk, ids in contexts)


def test_a_missed_source_chunk_takes_a_seeded_rank_not_always_the_last():
    """Always last would put it in the middle of every edge-ordered context, where over-long prompts are cut."""
    builder = Builder.__new__(Builder)
    builder.config, builder.top_k = SynthConfig(), 4
    assert builder.with_gold([5, 9, 7, 1], 9, "q") == [5, 9, 7, 1]
    placed = [builder.with_gold([5, 6, 7, 8], 9, f"q{i}") for i in range(400)]
    assert all(len(p) == 4 and p.count(9) == 1 and [x for x in p if x != 9] == [5, 6, 7] for p in placed)
    ranks = Counter(p.index(9) for p in placed)
    assert set(ranks) == {0, 1, 2, 3} and min(ranks.values()) > 60
    assert placed == [builder.with_gold([5, 6, 7, 8], 9, f"q{i}") for i in range(400)]  # stable between runs


def test_sft_records_share_one_system_prompt_and_end_in_end_of_turn(corpus_synth, tiny_model_dir):
    from transformers import AutoTokenizer

    _, tracker, result = corpus_synth
    folder = tracker.fetch(result.outputs["sft"])
    assert (folder / "system_prompt.txt").read_text() == SYSTEM_PROMPT
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = _jsonl(folder, "train.jsonl")
    assert {r["messages"][0]["content"] for r in records} == {SYSTEM_PROMPT}
    for record in records:
        ids = tokenizer.apply_chat_template(record["messages"], tokenize=True, return_dict=True)["input_ids"]
        assert (
            tokenizer.eos_token_id in ids[-2:]
            and tokenizer.decode(ids[ids.index(tokenizer.eos_token_id, len(ids) - 2) + 1 :]).strip() == ""
        )
    forms = Counter(r["meta"]["form"] for r in records)
    assert forms["rag"] and forms["closed_book"] and forms["abstention"]
    rag = next(r for r in records if r["meta"]["form"] == "rag")
    assert rag["messages"][1]["content"].startswith("Context:\n[1] ") and "\n\nQuestion: " in rag["messages"][1]["content"]


def test_dpo_pairs_use_every_rejection_strategy(corpus_synth):
    _, tracker, result = corpus_synth
    pairs = _jsonl(tracker.fetch(result.outputs["dpo"]), "train.jsonl")
    strategies = Counter(p["meta"]["strategy"] for p in pairs)
    assert set(strategies) == {"other_chunk", "altered", "other_question", "unsupported_answer", "needless_abstention"}
    assert 0.5 < strategies["needless_abstention"] / strategies["unsupported_answer"] < 2
    for pair in pairs:
        assert pair["prompt"][0] == {"role": "system", "content": SYSTEM_PROMPT}
        assert pair["chosen"][0]["content"] != pair["rejected"][0]["content"]
        if pair["meta"]["strategy"] == "unsupported_answer":
            assert pair["chosen"][0]["content"] == ABSTENTION
        if pair["meta"]["strategy"] == "needless_abstention":
            assert pair["rejected"][0]["content"] == ABSTENTION and pair["meta"]["form"] == "rag"


def test_empty_chunks_are_an_error_and_write_no_dataset(make_config, tmp_path):
    from doctune.ingest.stage import CHUNK_FEATURES, PAGE_FEATURES, _write_parquet

    config = make_config()
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("empty")
    producer = tracker.start_stage_run("ingest", parent, {})
    refs = {}
    for name, features in (("chunks", CHUNK_FEATURES), ("pages", PAGE_FEATURES)):
        (tmp_path / name).mkdir()
        _write_parquet([], features, tmp_path / name / f"{name}.parquet")
        refs[name] = producer.log_output(name, tmp_path / name, kind=name)
    with pytest.raises(SynthError, match="no chunks"):
        execute_stage("synth", config, tracker, parent, refs)
    failed = tracker.stage_runs(parent)  # only finished runs: the synth run is not among them
    assert all(r.data.tags["doctune.stage"] != "synth" for r in failed)
    synth_run = tracker.client.search_runs([tracker.experiment_id], "tags.`doctune.stage` = 'synth'")[0]
    assert synth_run.info.status == "FAILED" and not tracker.client.list_artifacts(synth_run.info.run_id, "sft")


# -- endpoint teachers -----------------------------------------------------------


class _Endpoint:
    """A real HTTP server on 127.0.0.1 whose replies each test scripts: good JSON, garbage, or errors."""

    def __init__(self, behave):
        self.behave = behave
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                status, content = outer.behave(len(outer.requests), body)
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()


GOOD = json.dumps({"questions": [{"question": "What does a box plot show?", "answer": "the median and the quartiles"}]})


def _teacher(url: str, **endpoint) -> EndpointTeacher:
    return EndpointTeacher(
        SynthConfig(teacher="endpoint", endpoint=EndpointConfig(base_url=url, max_retries=2, timeout_s=5, **endpoint))
    )


def _chunks(n: int) -> list[dict]:
    return [{**CHUNK, "chunk_id": f"doc-{i:04d}"} for i in range(n)]


def test_malformed_replies_are_retried_once_then_dropped_and_counted(tmp_path):
    endpoint = _Endpoint(lambda n, body: (200, GOOD if n % 3 == 0 else "not json at all"))
    try:
        qas, exchanges, counts = generate(_teacher(endpoint.url), _chunks(2), tmp_path / "ckpt.jsonl")
    finally:
        endpoint.close()
    # requests 1 and 2 (chunk 0, then its retry) are garbage -> chunk 0 dropped; request 3 (chunk 1) is good
    assert [qa.chunk_id for qa in qas] == ["doc-0001"]
    assert qas[0].answer == "the median and the quartiles" and qas[0].answer_start > 0
    assert counts["dropped_malformed_chunks"] == 1 and counts["malformed_replies"] == 2
    assert exchanges[0]["replies"] == ["not json at all", "not json at all"]
    assert endpoint.requests[0]["response_format"]["type"] == "json_object"


def test_endpoint_down_names_the_url_and_the_rerun_resumes(tmp_path):
    checkpoint = tmp_path / "ckpt.jsonl"
    endpoint = _Endpoint(lambda n, body: (200, GOOD) if n <= 3 else (503, "overloaded"))
    try:
        with pytest.raises(EndpointError, match=rf"{endpoint.url}/chat/completions failed after 3 attempts: HTTP 503"):
            generate(_teacher(endpoint.url), _chunks(6), checkpoint)
    finally:
        endpoint.close()
    assert len(checkpoint.read_text().splitlines()) == 3  # the finished chunks survive

    healthy = _Endpoint(lambda n, body: (200, GOOD))
    try:
        qas, _, counts = generate(_teacher(healthy.url), _chunks(6), checkpoint, concurrency=3)
    finally:
        healthy.close()
    assert len(healthy.requests) == 3 and counts["resumed_chunks"] == 3
    assert [qa.chunk_id for qa in qas] == [f"doc-{i:04d}" for i in range(6)]  # no chunk lost or duplicated


def test_the_api_key_comes_from_the_environment(tmp_path, monkeypatch):
    seen = []
    endpoint = _Endpoint(lambda n, body: (200, GOOD))
    monkeypatch.setenv("MY_TEACHER_KEY", "s3cret")
    original = endpoint.server.RequestHandlerClass.do_POST

    def capture(handler):
        seen.append(handler.headers.get("Authorization"))
        original(handler)

    endpoint.server.RequestHandlerClass.do_POST = capture
    try:
        generate(_teacher(endpoint.url, api_key_env="MY_TEACHER_KEY"), _chunks(1), tmp_path / "c.jsonl")
    finally:
        endpoint.close()
    assert seen == ["Bearer s3cret"]
    assert "s3cret" not in (tmp_path / "c.jsonl").read_text()


def test_local_teacher_counts_unparseable_output(tiny_model_dir, tmp_path):
    """A random model cannot write JSON: both tries are kept in the exchange and the chunk is dropped."""
    from doctune.synth.teachers import LocalTeacher

    config = SynthConfig(teacher="local", local={"model": str(tiny_model_dir), "max_new_tokens": 16})
    qas, exchanges, counts = generate(LocalTeacher(config, tmp_path), _chunks(1), tmp_path / "c.jsonl")
    assert qas == [] and counts["dropped_malformed_chunks"] == 1 and len(exchanges[0]["replies"]) == 2


@pytest.mark.server
def test_endpoint_teacher_against_a_live_llama_cpp_server(start_server, make_config, corpus, tmp_path, capsys):
    """`doctune stage synth --from-run ... --set synth.teacher=endpoint` with llama.cpp serving the bundled GGUF."""
    import sys

    import pymupdf

    from conftest import free_port
    from doctune.models import bundled_gguf
    from doctune_kfp.pipelines.cli import main

    pdfs = tmp_path / "pdfs"
    pdfs.mkdir()
    with pymupdf.open(corpus / "camlidl-1.04.doc.pdf") as doc:  # eight pages keep the test to a few requests
        doc.select([1, 2, 3, 4, 5, 6, 7, 8])
        doc.save(pdfs / "camlidl-excerpt.pdf", no_new_id=True)  # the same bytes, doc id and split every session
    config = make_config(pdfs)
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("endpoint-test")
    ingested = execute_stage("ingest", config, tracker, parent, {})
    n_chunks = json.loads((tracker.fetch(ingested.outputs["report"]) / "ingest_report.json").read_text())["summary"]["chunks"]

    port = free_port()
    gguf = bundled_gguf("smollm2-135m-instruct")
    start_server(
        [sys.executable, "-m", "doctune.llama_server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
         "--n_ctx", "4096", "--model_alias", "smollm2"],
        f"http://127.0.0.1:{port}/v1/models",
    )  # fmt: skip
    settings = {
        "project.workdir": config.project.workdir, "model.base_model": config.model.base_model,
        "synth.teacher": "endpoint", "synth.endpoint.base_url": f"http://127.0.0.1:{port}/v1",
        "synth.endpoint.model": "smollm2", "synth.endpoint.max_tokens": 160, "synth.endpoint.max_concurrency": 2,
        "synth.endpoint.temperature": 0, "synth.replay.share": 0,  # greedy: the same questions, so the same splits, each time
        "synth.min_golden": 0,  # eval takes synth.eval_fraction of the chunks: the few questions leave training some
    }  # fmt: skip
    args = ["stage", "synth", "--from-run", parent]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0, capsys.readouterr().err

    (run,) = tracker.stage_runs(parent, "synth")
    outputs = tracker.outputs_of(run)
    raw = tracker.fetch(outputs["raw"])
    exchanges = _jsonl(raw, "exchanges.jsonl")  # the raw replies, one record per chunk
    assert len({e["chunk_id"] for e in exchanges}) == len(exchanges) == n_chunks >= 3
    qas = _jsonl(raw, "qa.jsonl")
    assert qas and all(len(q["question"]) >= 8 and q["answer"] and q["qtype"] == "generated" for q in qas)
    report = json.loads((tracker.fetch(outputs["report"]) / "synth_report.json").read_text())
    assert report["teacher"] == "endpoint" and report["filters"]["generated"] == len(qas)
    assert report["datasets"]["sft_train"] > 0


def test_judge_through_the_endpoint_drops_position_biased_verdicts():
    """A judge that always prefers the first answer shown disagrees with itself once A and B are swapped."""
    pair = {
        "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "What does a box plot show?"}],
        "chosen": [{"role": "assistant", "content": "The median and the quartiles."}],
        "rejected": [{"role": "assistant", "content": "The mean and the variance."}],
    }
    positional = _Endpoint(lambda n, body: (200, json.dumps({"better": "A"})))
    fair = _Endpoint(
        lambda n, body: (200, json.dumps({"better": "A" if "Answer A:\nThe median" in body["messages"][1]["content"] else "B"}))
    )
    try:
        counts = Counter()
        assert judged([pair], _teacher(positional.url).judge, counts) == [] and counts["judge_disagreed"] == 1
        assert judged([pair], _teacher(fair.url).judge, Counter()) == [pair]
        assert positional.requests[0]["response_format"]["schema"]["properties"]["better"]["enum"] == ["A", "B"]
    finally:
        positional.close()
        fair.close()


def test_eval_chunks_grow_until_the_golden_target_and_validation_holds_questions():
    chunks = [{"chunk_id": f"c{i:03d}", "doc_id": "d", "text": ""} for i in range(400)]
    questions = Counter({f"c{i:03d}": 2 for i in range(0, 400, 2)})  # every other chunk holds two questions
    config = SynthConfig(min_golden=100, unanswerable_share=0.4, eval_fraction=0.15, max_eval_fraction=0.5)
    splits = assign_splits(chunks, config, questions)
    asked = {split: sum(n for cid, n in questions.items() if splits[cid] == split) for split in set(splits.values())}
    # 1.25 x 100 / (1 - 0.4) = 208 questions wanted; half of the 400 questions is the cap.
    assert 200 <= asked["eval"] <= 210 and asked["validation"] > 0 and asked["train"] > 150
    assert splits == assign_splits(chunks, config, questions)  # seeded: the same split every run
    # A corpus too small for the target: the eval stops at max_eval_fraction of the questions, training keeps the rest.
    small = Counter({cid: n for cid, n in list(questions.items())[:40]})
    few = assign_splits(chunks, config, small)
    assert sum(n for cid, n in small.items() if few[cid] == "eval") <= 0.5 * sum(small.values())
    assert sum(n for cid, n in small.items() if few[cid] in ("train", "validation")) >= 0.4 * sum(small.values())
