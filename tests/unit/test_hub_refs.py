"""Tests for rbee.hub.refs: parsing Hub references and choosing GGUF files (pure, no I/O)."""

from __future__ import annotations

import pytest

from rbee.errors import InvalidRequest, ModelAmbiguous, ModelNotFound
from rbee.hub.refs import (
    MAX_LISTED_FILES,
    QUANT_PREFERENCE,
    HubRef,
    choose_gguf,
    group_models,
    has_quant,
    is_hub_reference,
    parse_reference,
)

# --------------------------------------------------------------------------- parse_reference


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hf:acme/tiny-GGUF", HubRef("acme/tiny-GGUF")),
        ("acme/tiny-GGUF", HubRef("acme/tiny-GGUF")),
        ("  hf:acme/tiny-GGUF  ", HubRef("acme/tiny-GGUF")),
        ("hf:acme/tiny-GGUF:Q8_0", HubRef("acme/tiny-GGUF", quant="Q8_0")),
        ("hf:acme/tiny-GGUF:q4_k_m", HubRef("acme/tiny-GGUF", quant="Q4_K_M")),
        ("acme/tiny-GGUF:iq4_xs", HubRef("acme/tiny-GGUF", quant="IQ4_XS")),
        ("acme/tiny-GGUF:ud-q4_k_xl", HubRef("acme/tiny-GGUF", quant="UD-Q4_K_XL")),
        ("acme/tiny-GGUF:bf16", HubRef("acme/tiny-GGUF", quant="BF16")),
        (
            "hf:acme/tiny-GGUF/tiny.Q4_K_M.gguf",
            HubRef("acme/tiny-GGUF", filename="tiny.Q4_K_M.gguf"),
        ),
        (
            "hf:acme/x/Q4_K_M/x-00001-of-00002.gguf",
            HubRef("acme/x", filename="Q4_K_M/x-00001-of-00002.gguf"),
        ),
        ("hf:acme/tiny-GGUF@main", HubRef("acme/tiny-GGUF", revision="main")),
        ("acme/tiny-GGUF:Q8_0@v1.2", HubRef("acme/tiny-GGUF", quant="Q8_0", revision="v1.2")),
        (
            "hf:acme/t/a/b.gguf@refs/pr/12",
            HubRef("acme/t", filename="a/b.gguf", revision="refs/pr/12"),
        ),
        ("hf:acme/t@" + "a" * 40, HubRef("acme/t", revision="a" * 40)),
        ("hf:Org_1/Model.v2_x", HubRef("Org_1/Model.v2_x")),
        ("hf:" + "o" * 96 + "/" + "r" * 96, HubRef("o" * 96 + "/" + "r" * 96)),
    ],
)
def test_parse_valid(text: str, expected: HubRef) -> None:
    assert parse_reference(text) == expected


@pytest.mark.parametrize(
    ("ref", "canonical"),
    [
        (HubRef("acme/t"), "hf:acme/t"),
        (HubRef("acme/t", quant="Q8_0", revision="v1"), "hf:acme/t:Q8_0@v1"),
        (HubRef("acme/t", filename="a/b.gguf", revision="main"), "hf:acme/t/a/b.gguf@main"),
    ],
)
def test_canonical_round_trips(ref: HubRef, canonical: str) -> None:
    assert ref.canonical() == canonical
    assert parse_reference(canonical) == ref


def test_revision_defaults_to_main() -> None:
    assert parse_reference("acme/t").revision_or_default == "main"
    assert parse_reference("acme/t@dev").revision_or_default == "dev"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "expected ORG/REPO"),
        ("hf:", "expected ORG/REPO"),
        ("hf:tiny", "expected ORG/REPO"),
        ("hf:/repo", "empty org"),
        ("hf:acme/", "empty repo name"),
        ("hf:acme/tiny/", "empty file path"),
        ("hf:acme/tiny@", "empty revision"),
        ("hf:acme/tiny:", "is not a quant name"),
        ("hf:ac me/tiny", "may hold only letters"),
        ("hf:acme/tiny$", "may hold only letters"),
        ("hf:acme/ti~ny", "may hold only letters"),
        ("hf:-acme/tiny", "may not start or end"),
        ("hf:acme/tiny.", "may not start or end"),
        ("hf:acme/.tiny", "may not start or end"),
        ("hf:acme/ti..ny", "'..'"),
        ("hf:acme/ti--ny", "'--'"),
        ("hf:" + "o" * 97 + "/tiny", "longer than 96"),
        ("hf:acme/" + "r" * 97, "longer than 96"),
        ("hf:acme/tiny/../../etc/passwd.gguf", "'..'"),
        ("hf:acme/tiny/a/../b.gguf", "'..'"),
        ("hf:acme/tiny//etc/passwd.gguf", "must be relative"),
        ("hf:acme/tiny/a//b.gguf", "empty folder name"),
        ("hf:acme/tiny/a\\b.gguf", "backslash"),
        ("hf:acme/tiny/.hidden.gguf", "in file path"),
        ("hf:acme/tiny/-x.gguf", "in file path"),
        ("hf:acme/tiny/a b.gguf", "in file path"),
        ("hf:acme/tiny/model.bin", "must end in .gguf"),
        ("hf:acme/tiny/model.gguf:Q8_0", "':' is not allowed"),
        ("hf:acme/tiny:Q8_0/model.gguf", "not both"),
        ("hf:acme/tiny:K_M", "is not a quant name"),
        ("hf:acme/tiny:4_K_M", "is not a quant name"),
        ("hf:acme/tiny:Q4.K", "is not a quant name"),
        ("hf:acme/tiny:Q" + "4" * 40, "is not a quant name"),
        ("hf:acme/tiny@../main", "revision"),
        ("hf:acme/tiny@a..b", "revision"),
        ("hf:acme/tiny@dev/", "revision"),
        ("hf:acme/tiny@dev.lock", "revision"),
        ("hf:acme/tiny@/dev", "revision"),
        ("hf:acme/tiny@de v", "revision"),
        ("hf:acme/tiny@a@b", "revision"),
        ("hf:acme/tiny@" + "r" * 256, "longer than 255"),
        ("file:/models/x.gguf", "unknown prefix 'file:'"),
        ("https://huggingface.co/acme/tiny", "unknown prefix 'https:'"),
        ("hf:" + "a" * 3000, "longer than 2048"),
    ],
)
def test_parse_rejects(text: str, complaint: str) -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        parse_reference(text)
    assert complaint in excinfo.value.message
    assert "hf:ORG/REPO" in excinfo.value.suggestion


def test_parse_names_every_problem() -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        parse_reference("hf:-acme/ti..ny@a..b")
    message = excinfo.value.message
    assert "org '-acme'" in message and "repo name 'ti..ny'" in message and "revision" in message


def test_hubref_validates_when_built_directly() -> None:
    with pytest.raises(InvalidRequest, match=r"'\.\.'"):
        HubRef("acme/tiny", filename="../x.gguf")
    with pytest.raises(InvalidRequest, match="not both"):
        HubRef("acme/tiny", quant="Q8_0", filename="x.gguf")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hf:acme/tiny", True),
        ("hf:anything", True),  # meant for the Hub, even though invalid
        ("acme/tiny:Q8_0", True),
        (" acme/tiny ", True),
        ("smollm2-135m-instruct", False),  # a catalog name
        ("my-model:v2", False),
        ("file:/models/x.gguf", False),
        ("synthetic:50", False),
        ("https://huggingface.co/acme/tiny", False),
    ],
)
def test_is_hub_reference(text: str, expected: bool) -> None:
    assert is_hub_reference(text) is expected


# --------------------------------------------------------------------------- quant tokens


@pytest.mark.parametrize(
    ("stem", "quant", "expected"),
    [
        ("tiny-Q4_K_M", "Q4_K_M", True),
        ("tiny.Q4_K_M", "q4_k_m", True),
        ("tiny_Q4_K_M", "Q4_K_M", True),
        ("Q4_K_M/tiny", "Q4_K_M", True),  # a folder named after the quant
        ("tiny-q4_k_m-imatrix", "Q4_K_M", True),
        ("tiny-IQ4_K_M", "Q4_K_M", False),  # IQ4 is another family
        ("tiny-Q4_K_M", "Q4_K", False),  # '_' continues the quant's name
        ("tiny-Q4_0_4_4", "Q4_0", False),
        ("tiny-Q4_0", "Q4_0", True),
        ("tiny-Q8_0", "Q8", False),
        ("tiny-F16", "BF16", False),
        ("tiny-BF16", "F16", False),
        ("tiny-UD-Q4_K_XL", "Q4_K_XL", True),
        ("tiny-UD-Q4_K_XL", "UD-Q4_K_XL", True),
        ("tinyQ4_K_M", "Q4_K_M", False),
    ],
)
def test_has_quant(stem: str, quant: str, expected: bool) -> None:
    assert has_quant(stem, quant) is expected


# --------------------------------------------------------------------------- choose_gguf

ALL_QUANTS = [f"m-{q}.gguf" for q in QUANT_PREFERENCE]


def choose(files: list[str], text: str = "acme/m") -> list[str]:
    return choose_gguf(files, parse_reference(text))


def test_preference_order_is_walked() -> None:
    files = list(ALL_QUANTS)
    for quant in QUANT_PREFERENCE:
        assert choose(files) == [f"m-{quant}.gguf"]
        files.remove(f"m-{quant}.gguf")
    assert files == []


def test_default_prefers_q4_k_m_regardless_of_listing_order() -> None:
    files = ["README.md", "m-Q8_0.gguf", "m-F16.gguf", "m-Q4_K_M.gguf", "m-Q2_K.gguf"]
    assert choose(files) == ["m-Q4_K_M.gguf"]


def test_a_single_gguf_is_chosen_whatever_its_quant() -> None:
    assert choose(["README.md", "model-IQ2_XXS.gguf"]) == ["model-IQ2_XXS.gguf"]


def test_vision_projector_is_not_chosen_by_default() -> None:
    files = ["mmproj-m-F16.gguf", "m-Q8_0.gguf"]
    assert choose(files) == ["m-Q8_0.gguf"]
    assert choose(files, "acme/m/mmproj-m-F16.gguf") == ["mmproj-m-F16.gguf"]


def test_quant_picks_its_file() -> None:
    assert choose(ALL_QUANTS, "acme/m:q8_0") == ["m-Q8_0.gguf"]
    assert choose(ALL_QUANTS, "acme/m:IQ4_XS") == ["m-IQ4_XS.gguf"]
    assert choose(["m-Q4_K_M.gguf", "m-IQ4_K_M.gguf"], "acme/m:Q4_K_M") == ["m-Q4_K_M.gguf"]


def test_missing_quant_lists_what_there_is() -> None:
    with pytest.raises(ModelNotFound) as excinfo:
        choose(["m-Q8_0.gguf", "m-F16.gguf"], "acme/m:Q4_K_M")
    assert "quant Q4_K_M" in excinfo.value.message
    assert "m-F16.gguf" in excinfo.value.message and "m-Q8_0.gguf" in excinfo.value.message


def test_exact_file() -> None:
    files = ["a/m-Q8_0.gguf", "b/m-Q8_0.gguf"]
    assert choose(files, "acme/m/b/m-Q8_0.gguf") == ["b/m-Q8_0.gguf"]
    with pytest.raises(ModelNotFound, match=r"no file 'c/m-Q8_0\.gguf'.*a/m-Q8_0\.gguf"):
        choose(files, "acme/m/c/m-Q8_0.gguf")


def test_same_quant_twice_is_ambiguous() -> None:
    files = ["a/m-Q8_0.gguf", "b/m-Q8_0.gguf"]
    for text in ("acme/m", "acme/m:Q8_0"):
        with pytest.raises(ModelAmbiguous) as excinfo:
            choose(files, text)
        assert "a/m-Q8_0.gguf" in excinfo.value.message
        assert "b/m-Q8_0.gguf" in excinfo.value.message
        assert "hf:acme/m/a/m-Q8_0.gguf" in excinfo.value.suggestion


def test_no_preferred_quant_among_several_is_ambiguous() -> None:
    with pytest.raises(ModelAmbiguous, match="none of the preferred quants"):
        choose(["m-IQ1_S.gguf", "m-IQ2_M.gguf"])


def test_a_quant_matching_several_models_is_ambiguous() -> None:
    with pytest.raises(ModelAmbiguous, match="2 files for quant Q4_K_M"):
        choose(["m-Q4_K_M.gguf", "m-UD-Q4_K_M.gguf"], "acme/m:Q4_K_M")


def test_no_gguf_lists_a_truncated_file_list() -> None:
    files = [f"file{i:02d}.bin" for i in range(MAX_LISTED_FILES + 5)]
    with pytest.raises(ModelNotFound) as excinfo:
        choose(files)
    message = excinfo.value.message
    assert "has no GGUF file" in message and "file00.bin" in message
    assert f"file{MAX_LISTED_FILES + 4}.bin" not in message and "… and 5 more" in message


def test_empty_repo() -> None:
    with pytest.raises(ModelNotFound, match="it holds: nothing"):
        choose([])


SPLIT = [f"big-Q4_K_M-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]


def test_split_set_is_one_model_in_order() -> None:
    shuffled = [SPLIT[2], "README.md", SPLIT[0], SPLIT[1]]
    assert choose(shuffled) == SPLIT
    assert choose(shuffled, "acme/m:Q4_K_M") == SPLIT
    assert choose([*shuffled, "big-Q8_0.gguf"]) == SPLIT


def test_naming_one_part_pulls_the_whole_set() -> None:
    assert choose(SPLIT, f"acme/m/{SPLIT[1]}") == SPLIT


def test_split_set_in_a_subfolder() -> None:
    parts = [f"Q4_K_M/big-{i:05d}-of-00002.gguf" for i in (1, 2)]
    assert choose([*parts, "Q8_0/big-00001-of-00001.gguf"]) == parts


def test_incomplete_split_set_names_the_missing_part() -> None:
    with pytest.raises(ModelNotFound) as excinfo:
        choose([SPLIT[0], SPLIT[2]])
    assert "missing big-Q4_K_M-00002-of-00003.gguf" in excinfo.value.message
    with pytest.raises(ModelNotFound, match="00002-of-00003"):
        choose([SPLIT[0], SPLIT[2]], f"acme/m/{SPLIT[0]}")


def test_group_models() -> None:
    models = group_models(["x.txt", SPLIT[1], "a.gguf", SPLIT[0], "odd-00000-of-00002.gguf"])
    assert [m.files for m in models] == [
        ("a.gguf",),
        (SPLIT[0], SPLIT[1]),
        ("odd-00000-of-00002.gguf",),  # not a valid part number: a plain file
    ]
    assert models[1].missing == ("big-Q4_K_M-00003-of-00003.gguf",)
    assert models[1].stem == "big-Q4_K_M"
    assert models[1].describe() == f"{SPLIT[0]} (+2 parts)"
