"""`tpool models`: timm models with whether tpool patches them, built on the meta device."""

import json

import pytest

from test_flops import analytic_gmacs

from tpool_cli.catalog import FAMILY_EXAMPLES, describe, match_models
from tpool_cli.cli import main


def run(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(["models", *args])
    return exit_info.value.code, capsys.readouterr()


def test_lists_a_supported_model_with_its_facts(capsys):
    code, out = run(capsys, "deit_tiny_distilled_patch16_224", "--format", "json")
    assert code == 0, out.err
    (row,) = json.loads(out.out)["models"]
    assert row["supported"] and row["reason"] is None
    assert (row["family"], row["prefix_tokens"], row["pooling"], row["pos_embed"], row["img_size"]) == (
        "VisionTransformerDistilled", 2, "token", "absolute", 224
    )
    # DeiT-Ti with a second prefix token and a second head (distillation), counted on the meta device
    assert row["gmacs"] == pytest.approx(analytic_gmacs([(196, 196)] * 12, c=192, p=2) + 192 * 1000 * 1e-9, rel=1e-9)


def test_swin_is_named_unsupported_with_the_reason(capsys):
    code, out = run(capsys, "swin_tiny_patch4_window7_*", "--no-gmacs", "--format", "json")
    assert code == 0
    rows = json.loads(out.out)["models"]
    assert rows and all(not r["supported"] and "SwinTransformer" in r["reason"] for r in rows)


def test_naflex_is_refused_by_the_patch_and_listed_with_the_reason(capsys):
    """NaFlex passes the structural check (blocks, prefix tokens) but runs masked variable-resolution
    sequences: check_supported refuses it by family, and `tpool models` shows that refusal."""
    import timm
    import torch

    from tpool_cli.errors import TpoolError
    from tpool_cli.patch import check_supported

    with torch.device("meta"):
        model = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, depth=1)
    with pytest.raises(TpoolError, match="NaFlexVit is not supported: NaFlex ViTs run variable-resolution"):
        check_supported(model)
    code, out = run(capsys, "naflexvit_base_patch16_gap", "--no-gmacs", "--format", "json")
    (row,) = json.loads(out.out)["models"]
    assert code == 0 and not row["supported"] and row["family"] == "NaFlexVit"
    assert row["reason"].startswith("NaFlexVit is not supported: NaFlex ViTs run variable-resolution patch sequences")


def test_table_names_the_reasons(capsys):
    code, out = run(capsys, "swin_tiny_patch4_window7_224", "--no-gmacs")
    assert code == 0 and "not patched by tpool" in out.out and "SwinTransformer" in out.out


def test_a_pattern_that_matches_nothing_says_so(capsys):
    code, out = run(capsys, "no_such_vit_*")
    assert code == 2
    assert "no timm model matches 'no_such_vit_*'" in out.err and len(out.err.strip().splitlines()) == 1


def test_rope_families_are_listed_with_their_position_embedding():
    assert describe("vit_small_patch16_dinov3", gmacs=False).pos_embed == "rope"
    eva = describe("eva02_tiny_patch14_224", gmacs=False)
    assert (eva.family, eva.pos_embed, eva.pooling) == ("Eva", "both", "avg")


def test_default_listing_is_one_model_per_family():
    assert match_models(None) == list(FAMILY_EXAMPLES)
