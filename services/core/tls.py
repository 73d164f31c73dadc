"""Mutual TLS between the mesh's services: certificates for a local mesh, and credentials from them.

`make_certificates(dir)` (the `moemesh certs` command) writes a private CA
and, for each role (scheduler, worker, gateway, operator), a key and a
certificate signed by it, valid for localhost and 127.0.0.1, usable as server
and as client. Each certificate names its role twice: CN `moemesh-<role>` and
the SAN URI `moemesh:role:<role>`; `certificate_role` reads it back (the URI
when present, else the CN), and `services/core/auth.py` lets each method
accept only the roles that need it. A service given `tls_dir` serves its
internal port with TLS that requires a client certificate from the same CA,
and dials the others with its own certificate.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import pathlib

import grpc

from moemesh.services.core.tracing import client_interceptors

# The operator role is for people and tools (ListNodes); no service runs as it.
ROLES = ("scheduler", "worker", "gateway", "operator")
ROLE_URI_PREFIX = "moemesh:role:"
_CN_PREFIX = "moemesh-"


def make_certificates(out: pathlib.Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"), days: int = 365) -> None:
    """Write ca.crt, ca.key and <role>.crt / <role>.key for every role into `out`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def key_pem(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def write_private(path: pathlib.Path, data: bytes) -> None:
        path.write_bytes(data)
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "moemesh local CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (out / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    write_private(out / "ca.key", key_pem(ca_key))
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    for role in ROLES:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"moemesh-{role}")]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName([*names, x509.UniformResourceIdentifier(
                    f"{ROLE_URI_PREFIX}{role}")]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        (out / f"{role}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_private(out / f"{role}.key", key_pem(key))


def _read(tls_dir: pathlib.Path, role: str) -> tuple[bytes, bytes, bytes]:
    return ((tls_dir / "ca.crt").read_bytes(), (tls_dir / f"{role}.crt").read_bytes(),
            (tls_dir / f"{role}.key").read_bytes())


def server_credentials(tls_dir: pathlib.Path, role: str) -> grpc.ServerCredentials:
    """TLS for `role`'s port that requires a client certificate signed by the mesh's CA."""
    ca, cert, key = _read(tls_dir, role)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(tls_dir: pathlib.Path, role: str) -> grpc.ChannelCredentials:
    """TLS as `role` (its certificate as the client's), trusting only the mesh's CA."""
    ca, cert, key = _read(tls_dir, role)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


@functools.lru_cache(maxsize=64)  # a peer presents the same certificate on every call
def certificate_role(pem: bytes) -> str | None:
    """The mesh role a certificate carries: its `moemesh:role:<role>` SAN URI, else a CN `moemesh-<role>`.

    None when it names no known role, or names several (a certificate is one role).
    """
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(pem)
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    named = {uri.removeprefix(ROLE_URI_PREFIX) for uri in uris if uri.startswith(ROLE_URI_PREFIX)}
    if not named:
        named = {str(a.value).removeprefix(_CN_PREFIX) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
                 if str(a.value).startswith(_CN_PREFIX)}
    if len(named) != 1:
        return None
    role = named.pop()
    return role if role in ROLES else None


def aio_channel(target: str, tls_dir: pathlib.Path | None, role: str) -> grpc.aio.Channel:
    """A channel to another mesh service: mutual TLS when `tls_dir` is set, else plaintext; with tracing on, its
    per-request calls carry the trace context."""
    interceptors = client_interceptors() or None
    if tls_dir is None:
        return grpc.aio.insecure_channel(target, interceptors=interceptors)
    return grpc.aio.secure_channel(target, channel_credentials(tls_dir, role), interceptors=interceptors)
