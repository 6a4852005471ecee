"""The S3 artifact store against a real S3 endpoint: moto's server mode on 127.0.0.1.

Production keeps its blobs in S3 (MinIO in the compose file), so the store is tested over HTTP
with botocore's own signing, paginators and streaming bodies, not with an in-process mock.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import boto3
import pytest
import requests
from moto.server import ThreadedMotoServer

from service.artifacts import S3ArtifactStore
from service.cache import digest
from service.db import upgrade
from service.errors import KilnError
from service.models import Engine, utcnow
from service.services import Services
from service.store_budget import collect_orphans
from tests.conftest import _ServerThread, make_settings

BUCKET = "kiln-test"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "KILN_S3_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="kiln", AWS_SECRET_ACCESS_KEY="kiln-secret",
                      AWS_DEFAULT_REGION="us-east-1", KILN_S3_ENDPOINT_URL=url)
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
    try:
        yield url
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def store_uri(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    # A prefix per test: tests share the bucket, never each other's blobs.
    return f"s3://{BUCKET}/{request.node.name}"


def _blob(tmp_path: Path, name: str, size: int) -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


def test_put_get_range_size_delete_round_trip(store_uri: str, tmp_path: Path) -> None:
    store = S3ArtifactStore(store_uri)
    local = _blob(tmp_path, "e.bin", 3 * 1024 * 1024 + 17)  # several chunks, odd tail
    data = local.read_bytes()
    uri = store.put_file(local, "engines/e.bin")
    assert uri == f"{store_uri}/engines/e.bin"
    assert store.size(uri) == len(data)
    store.get_file(uri, tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data
    for start, end in ((0, 1), (5, 1024 * 1024 + 5), (len(data) - 17, len(data)),
                       (0, len(data))):
        assert b"".join(store.read_range(uri, start, end)) == data[start:end]
    assert b"".join(store.read_range(uri, 10, 10)) == b""
    store.delete(uri)
    assert [b.uri for b in store.list()] == []


def test_store_refuses_uris_outside_its_prefix(store_uri: str, tmp_path: Path) -> None:
    store = S3ArtifactStore(store_uri)
    neighbour = S3ArtifactStore(f"{store_uri}-neighbour")
    theirs = neighbour.put_file(_blob(tmp_path, "canary", 10), "engines/canary")
    for uri in (theirs, f"s3://other-bucket/{store_uri.split('/', 3)[3]}/x",
                f"{store_uri}/../elsewhere/x"):
        with pytest.raises(KilnError) as err:
            store.delete(uri)
        assert err.value.code == "bad_artifact_uri"
    assert [b.uri for b in store.list()] == []  # "prefix" does not list "prefix-neighbour/"
    assert [b.uri for b in neighbour.list()] == [theirs]


def test_listing_pages_past_1000_keys_and_resumes(store_uri: str) -> None:
    store = S3ArtifactStore(store_uri)
    keys = [f"{store.prefix}/models/{i:05d}" for i in range(1105)]
    for key in keys:  # straight PUTs: upload_file's transfer manager is slow for 1,105 tiny ones
        store.client.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    listed = [b.uri for b in store.list()]
    assert listed == [f"s3://{BUCKET}/{k}" for k in keys]  # all pages, in key order
    resumed = [b.uri for b in store.list(start_after=listed[999])]
    assert resumed == listed[1000:]


def _services(tmp_path: Path, store_uri: str, **overrides: object) -> Services:
    services = Services(make_settings(tmp_path / "kiln", artifact_uri=store_uri, **overrides))
    upgrade(services.settings.database_url)
    return services


def _engine_row(services: Services, local: Path, key: str) -> Engine:
    uri = services.store.put_file(local, key)
    sha = hashlib.sha256(local.read_bytes()).hexdigest()
    with services.db.session() as s:
        engine = Engine(cache_key=digest(key), model_hash="m", graph_hash="g", weights_hash="w",
                        backend="aoti", device="cpu", arch="x86_64", toolchain_id="t",
                        toolchain={}, options={}, options_hash=digest({}), profile=[],
                        profile_hash="p", artifact_uri=uri, sha256=sha,
                        size=local.stat().st_size, build_seconds=1.0,
                        build_report={"artifact_suffix": ".pt2"},
                        last_used_at=utcnow() - timedelta(hours=2))
        s.add(engine)
    return engine


def test_orphan_collection_on_s3_spares_referenced_and_foreign_blobs(store_uri: str,
                                                                     tmp_path: Path) -> None:
    services = _services(tmp_path, store_uri)
    kept = _engine_row(services, _blob(tmp_path, "kept", 100), "engines/kept.pt2")
    orphan = services.store.put_file(_blob(tmp_path, "orphan", 100), "engines/orphan.pt2")
    foreign = S3ArtifactStore(f"{store_uri}-foreign").put_file(_blob(tmp_path, "f", 5), "x")
    assert collect_orphans(services, grace_s=3600) == []  # too young to collect
    assert collect_orphans(services, grace_s=0) == [orphan]
    assert [b.uri for b in services.store.list()] == [kept.artifact_uri]
    assert [b.uri for b in S3ArtifactStore(f"{store_uri}-foreign").list()] == [foreign]


@pytest.fixture
def api_over_s3(store_uri: str, tmp_path: Path, request: pytest.FixtureRequest
                ) -> Iterator[tuple[Services, str]]:
    from service.app import create_app

    presign_s = getattr(request, "param", 0)
    services = _services(tmp_path, store_uri, download_presign_s=presign_s,
                         api_keys={"k-admin": ("root", "admin")})
    server = _ServerThread(create_app(services.settings))
    server.start()
    try:
        yield services, f"http://127.0.0.1:{server.server.server_port}"
    finally:
        server.server.shutdown()


AUTH = {"Authorization": "Bearer k-admin"}


def test_api_streams_engines_from_s3_with_range(api_over_s3: tuple[Services, str],
                                                tmp_path: Path) -> None:
    services, url = api_over_s3
    local = _blob(tmp_path, "big", 5 * 1024 * 1024 + 3)
    data = local.read_bytes()
    engine = _engine_row(services, local, "engines/big.pt2")
    art = f"{url}/api/v1/engines/{engine.id}/artifact"
    with requests.get(art, headers=AUTH, stream=True, timeout=30) as resp:
        assert resp.status_code == 200 and resp.headers["X-Kiln-Sha256"] == engine.sha256
        assert resp.headers["Content-Length"] == str(len(data))
        assert b"".join(resp.iter_content(chunk_size=256 * 1024)) == data
    part = requests.get(art, headers={**AUTH, "Range": "bytes=1048570-1048585"}, timeout=30)
    assert part.status_code == 206 and part.content == data[1048570:1048586]
    assert part.headers["Content-Range"] == f"bytes 1048570-1048585/{len(data)}"
    bad = requests.get(art, headers={**AUTH, "Range": f"bytes={len(data) + 5}-"}, timeout=30)
    assert bad.status_code == 416 and bad.json()["error"]["code"] == "range_not_satisfiable"
    assert requests.get(art, timeout=30).status_code == 401


@pytest.mark.parametrize("api_over_s3", [300], indirect=True)
def test_presigned_downloads_redirect_to_the_store(api_over_s3: tuple[Services, str],
                                                   s3_endpoint: str, tmp_path: Path) -> None:
    services, url = api_over_s3
    local = _blob(tmp_path, "eng", 200_000)
    engine = _engine_row(services, local, "engines/eng.pt2")
    art = f"{url}/api/v1/engines/{engine.id}/artifact"
    first = requests.get(art, headers=AUTH, allow_redirects=False, timeout=30)
    assert first.status_code == 302 and first.headers["Location"].startswith(s3_endpoint)
    assert first.headers["X-Kiln-Sha256"] == engine.sha256
    assert "no-store" in first.headers["Cache-Control"]
    assert "k-admin" not in first.headers["Location"]
    # requests drops the API key when the redirect leaves the API's host and port.
    whole = requests.get(art, headers=AUTH, timeout=30)
    assert whole.status_code == 200 and whole.content == local.read_bytes()
    assert hashlib.sha256(whole.content).hexdigest() == engine.sha256
    assert 'filename="' in whole.headers["Content-Disposition"]
    part = requests.get(art, headers={**AUTH, "Range": "bytes=100-199"}, timeout=30)
    assert part.status_code == 206 and part.content == local.read_bytes()[100:200]
    # Signed for the configured time only (moto does not check signatures: S3 and MinIO do).
    expires = int(parse_qs(urlparse(first.headers["Location"]).query)["Expires"][0])
    assert abs(expires - (time.time() + 300)) < 30
    assert requests.get(art, allow_redirects=False, timeout=30).status_code == 401
