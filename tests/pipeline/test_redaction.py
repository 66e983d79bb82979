"""Specification of redaction: the user-info of URLs and secret query values are masked, everything else is kept."""

import pytest

from pipeline.redaction import redact


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("http://user:s3cret@127.0.0.1:5000", "http://***@127.0.0.1:5000"),
        ("https://ghp_T0KEN@mirror.example.org/data/", "https://***@mirror.example.org/data/"),
        ("postgresql://mlflow:pa@ss@db.internal:5432/mlflow", "postgresql://***@db.internal:5432/mlflow"),
        ("http://u:p%40ss@host/mnist/train-images-idx3-ubyte.gz", "http://***@host/mnist/train-images-idx3-ubyte.gz"),
        (
            "https://bucket.s3.amazonaws.com/t.gz?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc123&x-id=GetObject",
            "https://bucket.s3.amazonaws.com/t.gz?X-Amz-Credential=***&X-Amz-Signature=***&x-id=GetObject",
        ),
        ("mysql://db/x?user=me&password=hunter2#top", "mysql://db/x?user=me&password=***#top"),
        ("https://host/api?token=abc&n=1", "https://host/api?token=***&n=1"),
    ],
)
def test_the_user_info_and_secret_query_values_of_a_url_are_masked(text, redacted):
    assert redact(text) == redacted


def test_urls_inside_messages_are_redacted_and_the_message_around_them_is_kept():
    message = (
        "could not fetch t10k-labels-idx1-ubyte from any of 2 sources:\n"
        "  http://alice:s3cret@127.0.0.1:8000/mnist/t10k-labels-idx1-ubyte.gz: HTTPError: HTTP Error 404\n"
        "  'https://bob@mirror/mnist/t10k-labels-idx1-ubyte.gz' (2 attempts); mail admin@example.org"
    )

    assert redact(message) == (
        "could not fetch t10k-labels-idx1-ubyte from any of 2 sources:\n"
        "  http://***@127.0.0.1:8000/mnist/t10k-labels-idx1-ubyte.gz: HTTPError: HTTP Error 404\n"
        "  'https://***@mirror/mnist/t10k-labels-idx1-ubyte.gz' (2 attempts); mail admin@example.org"
    )


@pytest.mark.parametrize(
    "text",
    [
        "sqlite:////home/me/mlruns/mlflow.db",
        "http://127.0.0.1:5000/#/experiments/1/runs/abc",
        "file:///data/mirror/mnist/train-images-idx3-ubyte.gz",
        "models:/vae-mnist@champion",
        "runs:/0123abcd/model",
        "see https://host/path and write to me@example.org",
        "https://host/search?keyword=token&monkey=1",
    ],
)
def test_text_without_credentials_is_left_as_it_is(text):
    assert redact(text) == text
