"""``sovra attest verify`` through attestation.cli with a parser built here.

Uses the real CCA vectors in ../shared/vectors when present (skipped with a reason otherwise,
unless CI=true), CCA tokens built with tests/cca_tokens.py, and simulated evidence made with
attestation.sim.encode_evidence and a P-384 root + device certificate from sovra.pki.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from attestation import cli, sim

try:
    from tests import cca_tokens as ct
    from tests.test_appraisal import MEASUREMENT, OTHER_MEASUREMENT, SimWorld
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    import cca_tokens as ct  # type: ignore[no-redef]
    from test_appraisal import (  # type: ignore[no-redef]
        MEASUREMENT,
        OTHER_MEASUREMENT,
        SimWorld,
    )

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="sovra")
    cli.register(parser.add_subparsers(dest="group", required=True))
    args = parser.parse_args(["attest", "verify", *argv])
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    code, out, _ = run([*argv, "--json"], capsys)
    return code, json.loads(out)


@pytest.fixture(scope="module")
def vectors() -> Path:
    folder = VECTORS / "cca"
    if not folder.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the external test vectors are missing: {folder}")
        pytest.skip(f"external CCA vectors not present at {folder} (shared/ beside the checkout)")
    return folder


# --------------------------------------------------------------------------- real vectors


@pytest.mark.vectors
def test_real_vector_verifies(vectors: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        ["--format", "cca", "--evidence", str(vectors / "tfrmm-token.cbor"),
         "--trust-anchor", str(vectors / "tfrmm-platform.pub.pem")],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "result: VERIFIED (signatures only" in out
    assert '"security_lifecycle": 12291' in out


@pytest.mark.vectors
def test_real_vector_appraised(
    vectors: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rv = tmp_path / "rv.yaml"
    rv.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "cca": {
                    "platform_keys": [str(vectors / "tfrmm-platform.pub.pem")],
                    "realm_initial_measurements": ["00" * 32],
                },
            }
        )
    )
    args = ["--format", "cca", "--evidence", str(vectors / "tfrmm-token.cbor")]
    code, doc = run_json([*args, "--reference-values", str(rv)], capsys)
    assert code == 0, doc
    assert doc["appraised"] and doc["status"] == "affirming" and doc["simulated"] is False
    assert doc["result"]["security_lifecycle_name"] == "secured"


@pytest.mark.vectors
def test_binding_mismatch_vector_refused(vectors: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = run_json(
        ["--format", "cca", "--evidence", str(vectors / "binding-mismatch-token.cbor"),
         "--trust-anchor", str(vectors / "binding-mismatch-ta.json")],
        capsys,
    )  # fmt: skip
    assert code == 1
    assert doc["error"]["type"] == "BindingMismatch"
    assert "not the sha-256 hash of the realm public key" in doc["error"]["reason"]


@pytest.mark.vectors
def test_vector_with_wrong_anchor_refused(
    vectors: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.pem"
    other.write_bytes(ct.public_pem(ct.generate_key("P-384")))
    code, out, err = run(
        ["--format", "cca", "--evidence", str(vectors / "tfrmm-token.cbor"),
         "--trust-anchor", str(other)],
        capsys,
    )  # fmt: skip
    assert code == 1
    assert err.startswith("REFUSED: platform token signature does not verify")


# --------------------------------------------------------------------------- built CCA tokens


@pytest.fixture(scope="module")
def built() -> ct.BuiltToken:
    return ct.build_cca_token(curve="P-384")


def _cca_files(folder: Path, built: ct.BuiltToken, anchor: str = "pem") -> tuple[Path, Path]:
    token = folder / "token.cbor"
    token.write_bytes(built.token)
    if anchor == "pem":
        ta = folder / "platform.pem"
        ta.write_bytes(ct.public_pem(built.platform_key))
    else:  # JWK set
        nums = built.platform_public_key.public_numbers()

        def b64(n: int) -> str:
            return base64.urlsafe_b64encode(n.to_bytes(48, "big")).rstrip(b"=").decode()

        ta = folder / "platform.jwks"
        ta.write_text(
            json.dumps(
                {"keys": [{"kty": "EC", "crv": "P-384", "x": b64(nums.x), "y": b64(nums.y)}]}
            )
        )
    return token, ta


@pytest.mark.parametrize("anchor", ["pem", "jwks"])
def test_built_token_verifies(
    tmp_path: Path, built: ct.BuiltToken, anchor: str, capsys: pytest.CaptureFixture[str]
) -> None:
    token, ta = _cca_files(tmp_path, built, anchor)
    code, doc = run_json(
        ["--format", "cca", "--evidence", str(token), "--trust-anchor", str(ta)], capsys
    )
    assert code == 0 and doc["verified"] and "appraised" not in doc
    assert doc["claims"]["realm"]["challenge"] == built.challenge.hex()


def _cca_rv(folder: Path, built: ct.BuiltToken, **cca: Any) -> Path:
    section = {"realm_initial_measurements": [built.realm_claims[44238].hex()], **cca}
    path = folder / "rv.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "cca": section}))
    return path


def test_built_token_appraised_and_refused(
    tmp_path: Path, built: ct.BuiltToken, capsys: pytest.CaptureFixture[str]
) -> None:
    token, ta = _cca_files(tmp_path, built)
    base = ["--format", "cca", "--evidence", str(token), "--trust-anchor", str(ta)]
    code, out, _ = run([*base, "--reference-values", str(_cca_rv(tmp_path, built))], capsys)
    assert code == 0 and "VERIFIED and APPRAISED" in out and "status: affirming" in out
    rv = _cca_rv(tmp_path, built, realm_initial_measurements=["22" * 32])
    code, doc = run_json([*base, "--reference-values", str(rv)], capsys)
    assert code == 1 and doc["verified"] and doc["status"] == "refused"
    assert doc["error"]["type"] == "AppraisalFailed"
    assert "is not a reference value" in doc["error"]["reason"]


def test_reference_values_platform_keys_must_also_verify(
    tmp_path: Path, built: ct.BuiltToken, capsys: pytest.CaptureFixture[str]
) -> None:
    token, ta = _cca_files(tmp_path, built)
    (tmp_path / "other.pem").write_bytes(ct.public_pem(ct.generate_key("P-384")))
    rv = _cca_rv(tmp_path, built, platform_keys=["other.pem"])
    code, doc = run_json(
        ["--format", "cca", "--evidence", str(token), "--trust-anchor", str(ta),
         "--reference-values", str(rv)],
        capsys,
    )  # fmt: skip
    assert code == 1 and doc["error"]["type"] == "UntrustedPlatformKey"
    assert "reference values cca.platform_keys" in doc["error"]["reason"]


def test_trust_anchor_from_reference_values_only(
    tmp_path: Path, built: ct.BuiltToken, capsys: pytest.CaptureFixture[str]
) -> None:
    token, _ = _cca_files(tmp_path, built)
    rv = _cca_rv(tmp_path, built, platform_keys=["platform.pem"])
    code, _ = run_json(
        ["--format", "cca", "--evidence", str(token), "--reference-values", str(rv)], capsys
    )
    assert code == 0


def test_tampered_token_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = ct.build_cca_token(curve="P-256", tamper_realm_claims={44238: b"\x99" * 32})
    token, ta = _cca_files(tmp_path, bad)
    code, doc = run_json(
        ["--format", "cca", "--evidence", str(token), "--trust-anchor", str(ta)], capsys
    )
    assert code == 1 and doc["error"]["type"] == "SignatureInvalid"
    assert "realm token signature" in doc["error"]["reason"]


# --------------------------------------------------------------------------- usage errors (2)


def test_unreadable_files_exit_2(
    tmp_path: Path, built: ct.BuiltToken, capsys: pytest.CaptureFixture[str]
) -> None:
    token, ta = _cca_files(tmp_path, built)
    code, _, err = run(
        ["--format", "cca", "--evidence", str(tmp_path / "nope"), "--trust-anchor", str(ta)], capsys
    )
    assert code == 2 and "cannot read evidence" in err
    (tmp_path / "junk.pem").write_text("hello")
    code, _, err = run(
        ["--format", "cca", "--evidence", str(token), "--trust-anchor", str(tmp_path / "junk.pem")],
        capsys,
    )
    assert code == 2 and "trust anchor" in err
    code, _, err = run(
        ["--format", "sim", "--evidence", str(token), "--trust-anchor", str(tmp_path / "junk.pem")],
        capsys,
    )
    assert code == 2 and "not a PEM certificate" in err
    (tmp_path / "rv.yaml").write_text("version: 2\n")
    code, doc = run_json(
        [
            "--format",
            "cca",
            "--evidence",
            str(token),
            "--trust-anchor",
            str(ta),
            "--reference-values",
            str(tmp_path / "rv.yaml"),
        ],
        capsys,
    )
    assert code == 2 and doc["error"]["type"] == "ReferenceValuesInvalid"


def test_no_trust_anchor_is_usage_error(
    tmp_path: Path, built: ct.BuiltToken, capsys: pytest.CaptureFixture[str]
) -> None:
    token, _ = _cca_files(tmp_path, built)
    code, _, err = run(["--format", "cca", "--evidence", str(token)], capsys)
    assert code == 2 and "no trust anchor" in err


def test_argparse_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        run(["--format", "tdx", "--evidence", "x"], capsys)
    assert exc.value.code == 2


# --------------------------------------------------------------------------- simulated evidence


@pytest.fixture(scope="module")
def world() -> SimWorld:
    return SimWorld()


def _sim_files(folder: Path, world: SimWorld, **claims: Any) -> tuple[Path, Path]:
    ev = folder / "evidence.cbor"
    ev.write_bytes(world.evidence(world.claims(**claims)))
    return ev, world.write_root(folder)


def _sim_rv(folder: Path, **doc: Any) -> Path:
    path = folder / "rv.yaml"
    base = {
        "version": 1,
        "simulation": "allow",
        "tee_types": [sim.SIM_TEE_TYPE],
        "measurements": [MEASUREMENT],
        "trust_anchors": {"sim_vendor_roots": ["sim-root.pem"]},
        "npu_measurements": [sim.npu_measurement(sim.DEFAULT_NPU_FIRMWARE)],
    }
    path.write_text(yaml.safe_dump({**base, **doc}))
    return path


def test_sim_without_reference_values_is_labelled(
    tmp_path: Path, world: SimWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    ev, root = _sim_files(tmp_path, world)
    code, out, _ = run(
        ["--format", "sim", "--evidence", str(ev), "--trust-anchor", str(root)], capsys
    )
    assert code == 0
    assert out.startswith("*** SIMULATED TEE EVIDENCE")
    assert "result: VERIFIED (signatures only" in out and '"enclave_id": "enc-1"' in out
    code, doc = run_json(
        ["--format", "sim", "--evidence", str(ev), "--trust-anchor", str(root)], capsys
    )
    assert doc["simulated"] is True and "SIMULATED" in doc["label"]
    assert doc["claims"]["simulated"] is True and doc["claims"]["measurement"] == MEASUREMENT
    (npu,) = doc["claims"]["npu_reports"]  # sovra-sim-tee/2: one report per simulated NPU
    assert npu["index"] == 0 and npu["firmware_version"] == sim.DEFAULT_NPU_FIRMWARE


def test_sim_appraised(tmp_path: Path, world: SimWorld, capsys: pytest.CaptureFixture[str]) -> None:
    ev, root = _sim_files(tmp_path, world)
    code, doc = run_json(
        ["--format", "sim", "--evidence", str(ev), "--reference-values", str(_sim_rv(tmp_path))],
        capsys,
    )
    assert code == 0 and doc["appraised"] and doc["status"] == "affirming"
    assert "not checked" in doc["key_binding"]


@pytest.mark.parametrize(
    ("doc", "claims", "kind", "reason"),
    [
        ({"simulation": "forbid"}, {}, "AppraisalFailed", "forbid simulation"),
        ({}, {"measurement": OTHER_MEASUREMENT}, "AppraisalFailed", "is not a reference value"),
        ({"revoked_measurements": [MEASUREMENT]}, {}, "AppraisalFailed", "is revoked"),
        ({"max_evidence_age_s": 60}, {"issued_at_ms": 0}, "EvidenceStale", "old"),
    ],
)
def test_sim_appraisal_refusals(
    tmp_path: Path, world: SimWorld, capsys: pytest.CaptureFixture[str],
    doc: dict[str, Any], claims: dict[str, Any], kind: str, reason: str,
) -> None:  # fmt: skip
    if "issued_at_ms" in claims:
        claims["issued_at_ms"] = int(time.time() * 1000) - 3_600_000
    ev, _ = _sim_files(tmp_path, world, **claims)
    code, out = run_json(
        [
            "--format",
            "sim",
            "--evidence",
            str(ev),
            "--reference-values",
            str(_sim_rv(tmp_path, **doc)),
        ],
        capsys,
    )
    assert code == 1 and out["error"]["type"] == kind and reason in out["error"]["reason"]
    assert out["simulated"] is True


def test_sim_revoked_device_cert(
    tmp_path: Path, world: SimWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    ev, _ = _sim_files(tmp_path, world)
    rv = _sim_rv(tmp_path, revoked_device_certs=[f"{world.device.serial_number:x}"])
    code, out = run_json(
        ["--format", "sim", "--evidence", str(ev), "--reference-values", str(rv)], capsys
    )
    assert code == 1 and out["error"]["type"] == "UntrustedChain"


def test_sim_wrong_root_refused(
    tmp_path: Path, world: SimWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    ev, _ = _sim_files(tmp_path, world)
    other = tmp_path / "other.pem"
    other.write_bytes(SimWorld("enc-2").root.public_bytes(serialization.Encoding.PEM))
    code, out, err = run(
        ["--format", "sim", "--evidence", str(ev), "--trust-anchor", str(other)], capsys
    )
    assert code == 1 and "does not chain to a configured simulated vendor root" in err
    assert "SIMULATED" in out


def test_cca_evidence_given_as_sim_refused(
    tmp_path: Path, world: SimWorld, built: ct.BuiltToken, capsys: pytest.CaptureFixture[str]
) -> None:
    token, _ = _cca_files(tmp_path, built)
    root = world.write_root(tmp_path)
    code, doc = run_json(
        ["--format", "sim", "--evidence", str(token), "--trust-anchor", str(root)], capsys
    )
    assert code == 1 and doc["error"]["type"] == "EvidenceMalformed"
