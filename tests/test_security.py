"""TLS, mutual TLS and bearer tokens (docs/design.md section 11), with throwaway certificates: the
coordinator reaches draft and target over mutual TLS, serves its client API over TLS with a
bearer token; clients without a valid certificate or token are refused, health and reflection
stay open."""

import datetime
import ipaddress
import threading
import time

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster import Cluster
from conftest import greedy_reference
from pearl import cli
from pearl.client import Client
from protos.v1 import pearl_pb2 as pb
from protos.v1 import pearl_pb2_grpc
from specdec.security import ClientTLS, ServerTLS

PROMPT = [3, 1, 4, 1, 5, 9]
TOKEN = "s3cret-token"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, ca: bool, server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


class Pki:
    """A CA and certificates it signed, written as PEM files."""

    def __init__(self, root, name: str):
        self.root, self.name = root, name
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.ca = self._write(f"{name}-ca", _cert(f"{name} CA", self.key, f"{name} CA", self.key,
                                                  ca=True))

    def _write(self, stem: str, cert, key=None) -> str:
        path = self.root / f"{stem}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            (self.root / f"{stem}.key").write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
        return str(path)

    def issue(self, cn: str, server: bool = False) -> tuple[str, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(cn, key, f"{self.name} CA", self.key, ca=False, server=server)
        stem = f"{self.name}-{cn}"
        return self._write(stem, cert, key), str(self.root / f"{stem}.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    good, rogue = Pki(root, "good"), Pki(root, "rogue")
    return dict(good=good, rogue=rogue, server=good.issue("server", server=True),
                client=good.issue("coordinator"), rogue_client=rogue.issue("coordinator"))


@pytest.fixture(scope="module")
def secure(tiny_draft, tiny_target, pki):
    good = pki["good"]
    cert, key = pki["server"]
    ccert, ckey = pki["client"]
    mtls = dict(tls=ServerTLS(cert, key, good.ca))  # draft and target require client certs
    c = Cluster(tiny_draft, tiny_target, draft_kw=mtls, target_kw=mtls, coordinator_kw=dict(
        tls=ServerTLS(cert, key), backend_tls=ClientTLS(good.ca, ccert, ckey),
        auth_token=TOKEN))
    yield c
    c.close()


@pytest.fixture(scope="module")
def ref(tiny_target):
    return greedy_reference(tiny_target, PROMPT, 8)


def test_tls_client_api_with_token(secure, pki, ref):
    with Client(secure.address, timeout_s=20, tls_ca=pki["good"].ca, token=TOKEN) as c:
        r = c.complete(PROMPT, mode="pearl", max_new_tokens=8, ignore_eos=True)
    assert r.token_ids == ref and not r.stats["fell_back"]  # the draft was used over mTLS
    assert r.stats["accepted_tokens"] > 0


@pytest.mark.parametrize("token,why", [(None, "missing"), ("wrong", "invalid")])
def test_missing_or_wrong_token_is_unauthenticated(secure, pki, token, why):
    with Client(secure.address, timeout_s=20, tls_ca=pki["good"].ca, token=token) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.complete(PROMPT, mode="ar", max_new_tokens=2)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert why in e.value.details()


def test_health_and_reflection_stay_open_without_token(secure, pki):
    creds = ClientTLS(pki["good"].ca).credentials()
    with grpc.secure_channel(secure.address, creds) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                      timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        names = {s.name for s in resp.list_services_response.service}
    assert "pearl.v1.Coordinator" in names


def test_client_api_refuses_plaintext_and_untrusted_ca(secure, pki):
    with Client(secure.address, timeout_s=3, token=TOKEN) as c:  # no TLS at all
        with pytest.raises(grpc.RpcError) as e:
            c.complete(PROMPT, mode="ar", max_new_tokens=2)
    assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    with Client(secure.address, timeout_s=3, tls_ca=pki["rogue"].ca, token=TOKEN) as c:
        with pytest.raises(grpc.RpcError) as e:  # the server's certificate is not trusted
            c.complete(PROMPT, mode="ar", max_new_tokens=2)
    assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@pytest.mark.parametrize("who", ["no certificate", "rogue certificate", "plaintext"])
def test_backends_refuse_clients_without_a_valid_certificate(secure, pki, who):
    """Draft and target speak mutual TLS: only holders of a certificate signed by the CA get in."""
    for address, stub in ((secure.target_address, pearl_pb2_grpc.TargetServiceStub),
                          (secure.draft_address, pearl_pb2_grpc.DraftServiceStub)):
        if who == "plaintext":
            ch = grpc.insecure_channel(address)
        else:
            cert, key = (None, None) if who == "no certificate" else pki["rogue_client"]
            ch = grpc.secure_channel(address, ClientTLS(pki["good"].ca, cert, key).credentials())
        with ch, pytest.raises(grpc.RpcError) as e:
            stub(ch).GetModelInfo(pb.ModelInfoRequest(), timeout=3)
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                  grpc.StatusCode.DEADLINE_EXCEEDED), who
    cert, key = pki["client"]  # the coordinator's certificate does get in
    with grpc.secure_channel(secure.target_address,
                             ClientTLS(pki["good"].ca, cert, key).credentials()) as ch:
        info = pearl_pb2_grpc.TargetServiceStub(ch).GetModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert info.vocab_size == 512


def test_generate_cli_with_tls_and_token(secure, pki, capsys, monkeypatch):
    monkeypatch.setenv("PEARL_AUTH_TOKEN", TOKEN)
    cli.main(["generate", "abc", "--coordinator", secure.address, "--tls-ca", pki["good"].ca,
              "--mode", "sd", "--max-new-tokens", "4", "--json"])
    assert '"new_tokens": 4' in capsys.readouterr().out
    monkeypatch.delenv("PEARL_AUTH_TOKEN")
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "abc", "--coordinator", secure.address, "--tls-ca",
                  pki["good"].ca, "--max-new-tokens", "4"])
    assert "UNAUTHENTICATED" in str(e.value)


def ends_within(fn, within_s: float) -> BaseException | None:
    """What ``fn()`` raised (None if nothing), failing the test should it run past ``within_s``:
    a client that hangs fails here instead of stalling the suite."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - SystemExit is what the CLI ends with
            raised.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(within_s)
    assert not t.is_alive(), f"still waiting after {within_s} s"
    return raised[0] if raised else None


@pytest.mark.parametrize("tls, hint", [
    ("plaintext", "is the server using TLS?"),
    ("untrusted CA", "did the CA in --tls-ca sign its certificate?"),
])
def test_generate_cli_without_the_servers_ca_fails_promptly_and_says_why(secure, pki, tls, hint):
    """Plaintext to a TLS port, or TLS with a CA that did not sign the server's certificate: the
    handshake fails on every try, and a call that waits for the channel to be ready used to wait
    forever. Now: a non-zero exit within the connect timeout that names the likely cause."""
    flags = [] if tls == "plaintext" else ["--tls-ca", pki["rogue"].ca]
    t0 = time.monotonic()
    err = ends_within(lambda: cli.main(["generate", "abc", "--coordinator", secure.address,
                                        "--connect-timeout", "1", "--max-new-tokens", "2",
                                        "--auth-token", TOKEN, *flags]), 30)
    assert isinstance(err, SystemExit), err
    assert err.code not in (0, None)
    msg = str(err.code)
    assert f"could not connect to {secure.address} within 1 s" in msg, msg
    assert hint in msg and "--tls-ca" in msg, msg
    assert time.monotonic() - t0 < 8, "the connect timeout was not what bounded the wait"


def test_serve_flags_build_the_credentials(pki):
    cert, key = pki["server"]
    a = cli.argparse.Namespace(role="coordinator", tls_cert=cert, tls_key=key, tls_ca=None,
                               backend_tls_ca=pki["good"].ca, backend_tls_cert=None,
                               backend_tls_key=None, auth_token="t", max_sessions=3,
                               session_idle_s=1, max_prompt_tokens=10, max_new_tokens=20,
                               draft_timeout=2)
    kw = cli.serve_kwargs(a)
    assert kw["tls"] == ServerTLS(cert, key) and kw["backend_tls"] == ClientTLS(pki["good"].ca)
    assert (kw["auth_token"], kw["max_sessions"], kw["max_prompt_tokens"]) == ("t", 3, 10)
    with pytest.raises(ValueError, match="--tls-ca needs"):
        ServerTLS.from_flags(None, None, pki["good"].ca)
