"""parse_ref: every accepted form, the keys the cache uses, and the one error for anything else."""

import pytest

from flux_lora.errors import UserError
from flux_lora.weights.refs import (
    CivitaiModelRef,
    CivitaiVersionRef,
    DataUri,
    HttpUrl,
    HuggingFaceRef,
    LocalFile,
    RefError,
    ReplicateDeliveryUrl,
    ReplicateRef,
    parse_ref,
    redact_url,
)

V = "a" * 64


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("fofr/flux-pixar-cars", ReplicateRef("fofr", "flux-pixar-cars")),
        (f"fofr/flux-pixar-cars/{V}", ReplicateRef("fofr", "flux-pixar-cars", V)),
        (f"fofr/flux-pixar-cars/versions/{V}", ReplicateRef("fofr", "flux-pixar-cars", V)),
        ("  fofr/flux.v2_x  ", ReplicateRef("fofr", "flux.v2_x")),
        ("https://replicate.com/fofr/flux-pixar-cars", ReplicateRef("fofr", "flux-pixar-cars")),
        (
            f"https://replicate.com/fofr/flux-pixar-cars/versions/{V}",
            ReplicateRef("fofr", "flux-pixar-cars", V),
        ),
        (f"replicate.com/fofr/flux-pixar-cars/{V}", ReplicateRef("fofr", "flux-pixar-cars", V)),
        (f"https://replicate.com/fofr/m/versions/{V}/_weights", ReplicateRef("fofr", "m", V)),
        (
            "https://replicate.delivery/yhqm/abc/trained_model.tar",
            ReplicateDeliveryUrl("https://replicate.delivery/yhqm/abc/trained_model.tar"),
        ),
        (
            "https://pbxt.replicate.delivery/x/out.tar",
            ReplicateDeliveryUrl("https://pbxt.replicate.delivery/x/out.tar"),
        ),
        ("huggingface.co/acme/lora", HuggingFaceRef("acme/lora")),
        ("https://huggingface.co/acme/lora", HuggingFaceRef("acme/lora")),
        ("https://huggingface.co/acme/lora/", HuggingFaceRef("acme/lora")),
        (
            "huggingface.co/acme/lora/my_lora.safetensors",
            HuggingFaceRef("acme/lora", None, "my_lora.safetensors"),
        ),
        (
            "https://huggingface.co/acme/lora/resolve/main/sub/x.safetensors?download=true",
            HuggingFaceRef("acme/lora", "main", "sub/x.safetensors"),
        ),
        (
            "https://huggingface.co/acme/lora/blob/v1.0/x.safetensors",
            HuggingFaceRef("acme/lora", "v1.0", "x.safetensors"),
        ),
        ("https://huggingface.co/acme/lora/tree/dev", HuggingFaceRef("acme/lora", "dev", None)),
        ("civitai.com/models/12345", CivitaiModelRef(12345)),
        ("https://civitai.com/models/12345/some-slug", CivitaiModelRef(12345)),
        ("https://civitai.com/models/12345/some-slug?modelVersionId=678", CivitaiModelRef(12345, 678)),
        ("https://civitai.com/api/download/models/678", CivitaiVersionRef(678)),
        ("https://civitai.com/api/download/models/678?type=Model&format=SafeTensor", CivitaiVersionRef(678)),
        (
            "https://example.com/x/lora.safetensors?X-Amz-Signature=s3cr3t",
            HttpUrl("https://example.com/x/lora.safetensors?X-Amz-Signature=s3cr3t"),
        ),
        ("http://example.com/lora.tar.gz", HttpUrl("http://example.com/lora.tar.gz")),
        ("data:application/octet-stream;base64,AAAA", DataUri("data:application/octet-stream;base64,AAAA")),
        ("/models/lora.safetensors", LocalFile("/models/lora.safetensors")),
        ("./lora.tar", LocalFile("./lora.tar")),
        ("weights/my.safetensors", LocalFile("weights/my.safetensors")),
        ("file:///srv/my%20lora.safetensors", LocalFile("/srv/my lora.safetensors")),
    ],
)
def test_accepted_forms(text, expected):
    assert parse_ref(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "just-a-name",
        "a/b/c/d/e",
        "ftp://example.com/x.safetensors",
        "civitai.com/user/someone",
        "huggingface.co/acme",
        "huggingface.co/acme/lora/readme.md",
        "https://replicate.com/fofr",
        "https://civitai.com/models/abc",
        "huggingface.co/datasets/acme/data",
    ],
)
def test_unrecognised_input_lists_the_accepted_forms(text):
    with pytest.raises(RefError) as info:
        parse_ref(text)
    message = str(info.value)
    assert isinstance(info.value, UserError)
    for form in (
        "owner/model",
        "huggingface.co/owner/repo",
        "civitai.com/models/<id>",
        "data: URI",
        "local file",
    ):
        assert form in message
    assert "\n" not in message


def test_pickle_urls_are_refused_with_their_own_reason():
    with pytest.raises(RefError, match=r"pickle checkpoint \(\.ckpt\)") as info:
        parse_ref("https://example.com/model.ckpt?token=abc")
    assert "abc" not in str(info.value)


def test_model_id_and_version_id_stay_distinct():
    assert (
        parse_ref("civitai.com/models/5").cache_key
        != parse_ref("civitai.com/api/download/models/5").cache_key
    )
    assert parse_ref("civitai.com/models/5?modelVersionId=7").cache_key == "civitai:model/5/version/7"


def test_cache_keys_are_stable_and_hide_query_strings():
    same = ["fofr/m", "https://replicate.com/fofr/m", "replicate.com/fofr/m/"]
    assert {parse_ref(t).cache_key for t in same} == {"replicate:fofr/m"}
    signed = parse_ref("https://example.com/a.safetensors?sig=SECRET").cache_key
    assert "SECRET" not in signed and signed.startswith("url:https://example.com/a.safetensors?sha256=")
    assert signed != parse_ref("https://example.com/a.safetensors?sig=OTHER").cache_key
    assert parse_ref("huggingface.co/a/b").cache_key == "hf:a/b@main"
    assert parse_ref("huggingface.co/a/b/resolve/v2/c.safetensors").cache_key == "hf:a/b@v2/c.safetensors"


def test_redact_url_drops_query_and_credentials():
    assert (
        redact_url("https://user:pw@host.example:8443/p/a.tar?token=x")
        == "https://host.example:8443/p/a.tar?…"
    )


@pytest.mark.parametrize(
    "text",
    [
        "huggingface.co/a?token=SECRET2",
        "https://civitai.com/user/x?token=SECRET2",
        "ftp://user:SECRET2@example.com/a.safetensors",
        "https://user:SECRET2@replicate.com/owner",
        "http://[::1/x?token=SECRET2",
    ],
)
def test_rejected_references_are_shown_without_query_or_credentials(text):
    with pytest.raises(RefError) as info:
        parse_ref(text)
    assert "SECRET2" not in str(info.value)
