"""TLS (NBD_OPT_STARTTLS): real clients with certificates made here, and the protocol's rules
tried by a hand-written client the way an attacker would."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from _helpers import new_name
from test_nbd_clients import SERVE_CMD, TIMEOUT, Serve, need, ok, run
from test_nbd_protocol import Client, info_export

import shmdisk
from shmdisk.nbd import NBDServer, TLSConfigError
from shmdisk.nbd import _proto as P
from shmdisk.nbd._tls import parse_psk_file, psk_supported

MiB = 1 << 20


# --- certificates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PKI:
    """Certificate directories in the layout nbdkit, qemu and libnbd use."""

    server: str  # ca-cert.pem, server-cert.pem, server-key.pem
    client: str  # ca-cert.pem, client-cert.pem, client-key.pem
    rogue_client: str  # trusts the right CA, but has a client certificate another CA signed
    wrong_ca: str  # a good client certificate, but another CA to check the server with
    anonymous: str  # ca-cert.pem only: checks the server, presents no certificate


CA_INFO = "cn = {cn}\nca\ncert_signing_key\nexpiration_days = 2\n"
SERVER_INFO = (
    "cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\n"
    "tls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n"
)
CLIENT_INFO = (
    "cn = client.example\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 2\n"
)


def certtool(d: str, *args: str) -> None:
    subprocess.run(["certtool", *args], cwd=d, check=True, capture_output=True, timeout=TIMEOUT)


def make_with_certtool(d: str) -> None:
    """ca, rca (another CA), server and client (signed by ca), rclient (signed by rca)."""
    for name, text in (("ca", CA_INFO.format(cn="test CA")), ("rca", CA_INFO.format(cn="rogue"))):
        with open(os.path.join(d, f"{name}.info"), "w") as f:
            f.write(text)
    for name, text in (("server", SERVER_INFO), ("client", CLIENT_INFO)):
        with open(os.path.join(d, f"{name}.info"), "w") as f:
            f.write(text)
    for key in ("ca", "rca", "server", "client", "rclient"):
        certtool(d, "--generate-privkey", "--key-type=ecdsa", "--outfile", f"{key}-key.pem")
    for ca in ("ca", "rca"):
        certtool(
            d, "--generate-self-signed", "--load-privkey", f"{ca}-key.pem",
            "--template", f"{ca}.info", "--outfile", f"{ca}-cert.pem",
        )  # fmt: skip
    for who, ca, info in (("server", "ca", "server"), ("client", "ca", "client"),
                          ("rclient", "rca", "client")):  # fmt: skip
        certtool(
            d, "--generate-certificate", "--load-ca-certificate", f"{ca}-cert.pem",
            "--load-ca-privkey", f"{ca}-key.pem", "--load-privkey", f"{who}-key.pem",
            "--template", f"{info}.info", "--outfile", f"{who}-cert.pem",
        )  # fmt: skip


def openssl(d: str, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=TIMEOUT)


def make_with_openssl(d: str) -> None:
    """The same files as make_with_certtool, made with openssl."""
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    for ca, cn in (("ca", "test CA"), ("rca", "rogue")):
        openssl(
            d, "req", "-x509", *curve, "-keyout", f"{ca}-key.pem", "-out", f"{ca}-cert.pem",
            "-subj", f"/CN={cn}", "-days", "2",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
    ext = {
        "server": "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        "client": "extendedKeyUsage=clientAuth\n",
    }
    for kind, text in ext.items():
        with open(os.path.join(d, f"{kind}.ext"), "w") as f:
            f.write(text)
    for who, ca, kind, cn in (("server", "ca", "server", "localhost"),
                              ("client", "ca", "client", "client.example"),
                              ("rclient", "rca", "client", "client.example")):  # fmt: skip
        openssl(
            d,
            "req",
            *curve,
            "-keyout",
            f"{who}-key.pem",
            "-out",
            f"{who}.csr",
            "-subj",
            f"/CN={cn}",
        )
        openssl(
            d, "x509", "-req", "-in", f"{who}.csr", "-CA", f"{ca}-cert.pem",
            "-CAkey", f"{ca}-key.pem", "-CAcreateserial", "-out", f"{who}-cert.pem",
            "-days", "2", "-extfile", f"{kind}.ext",
        )  # fmt: skip


def lay_out(d: str) -> PKI:
    """Copy the made files into the per-party directories clients and servers expect."""

    def folder(name: str, files: dict[str, str]) -> str:
        path = os.path.join(d, name)
        os.mkdir(path)
        for dest, src in files.items():
            shutil.copy(os.path.join(d, src), os.path.join(path, dest))
        return path

    server = {"ca-cert.pem": "ca-cert.pem", "server-cert.pem": "server-cert.pem",
              "server-key.pem": "server-key.pem"}  # fmt: skip
    client = {"ca-cert.pem": "ca-cert.pem", "client-cert.pem": "client-cert.pem",
              "client-key.pem": "client-key.pem"}  # fmt: skip
    rogue = dict(client, **{"client-cert.pem": "rclient-cert.pem",
                            "client-key.pem": "rclient-key.pem"})  # fmt: skip
    wrong = dict(client, **{"ca-cert.pem": "rca-cert.pem"})
    rogue_dir = folder("rogue", rogue)
    # Both CAs, so that the client trusts the server and qemu's check of its own certificate
    # passes: what is left to refuse it is the server.
    with open(os.path.join(d, "rca-cert.pem")) as f, open(f"{rogue_dir}/ca-cert.pem", "a") as out:
        out.write(f.read())
    return PKI(
        server=folder("server", server),
        client=folder("client", client),
        rogue_client=rogue_dir,
        wrong_ca=folder("wrong-ca", wrong),
        anonymous=folder("anonymous", {"ca-cert.pem": "ca-cert.pem"}),
    )


@pytest.fixture(scope="module")
def pki() -> Iterator[PKI]:
    """A CA with a server certificate for localhost/127.0.0.1 and a client certificate, and a
    second CA with a client certificate of its own (certtool, or openssl without it)."""
    if shutil.which("certtool"):
        make = make_with_certtool
    elif shutil.which("openssl"):
        make = make_with_openssl
    else:
        pytest.skip("needs certtool (gnutls-bin) or openssl to make certificates")
    d = tempfile.mkdtemp(prefix="nbdtls")
    try:
        make(d)
        yield lay_out(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --- servers and clients ---------------------------------------------------------------------


@pytest.fixture
def disk() -> Iterator[shmdisk.Disk]:
    """A 4 MiB disk."""
    name = new_name("nbdtls")
    d = shmdisk.create(name, 4 * MiB // 512)
    yield d
    d.disconnect()
    shmdisk.destroy(name)


@pytest.fixture
def server(pki: PKI, disk: shmdisk.Disk) -> Iterator[NBDServer]:
    """TCP on loopback, TLS required (the default over TCP), client certificates checked."""
    with NBDServer(
        [disk], host="127.0.0.1", port=0, tls_certificates=pki.server, tls_verify_peer=True
    ) as srv:
        yield srv


def port_of(srv: NBDServer) -> int:
    address = srv.address
    assert isinstance(address, tuple)
    return address[1]


def nbds(srv: NBDServer, name: str, certs: str) -> str:
    return f"nbds://localhost:{port_of(srv)}/{name}?tls-certificates={certs}"


def qemu_opts(srv: NBDServer, name: str, certs: str) -> list[str]:
    """qemu-img/qemu-io arguments for the export over TLS with the certificates in ``certs``."""
    return [
        "--object",
        f"tls-creds-x509,id=tls0,dir={certs},endpoint=client",
        "--image-opts",
        f"driver=nbd,host=localhost,port={port_of(srv)},export={name},tls-creds=tls0",
    ]


def tcp_client(srv: NBDServer) -> Client:
    c = Client.__new__(Client)
    c.sock = socket.create_connection(("127.0.0.1", port_of(srv)), timeout=TIMEOUT)
    c.structured = False
    return c


def client_context(pki: PKI, certificate: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=os.path.join(pki.client, "ca-cert.pem"))
    if certificate:
        ctx.load_cert_chain(
            os.path.join(pki.client, "client-cert.pem"), os.path.join(pki.client, "client-key.pem")
        )
    return ctx


def starttls(c: Client, ctx: ssl.SSLContext) -> None:
    """Ask for TLS and wrap the client's socket once the server agrees."""
    c.option(P.OPT_STARTTLS)
    kind, _ = c.reply(P.OPT_STARTTLS)
    assert kind == P.REP_ACK
    c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")


# --- real clients ----------------------------------------------------------------------------


@need("nbdinfo", "nbdcopy", "qemu-img", "qemu-io")
def test_real_clients_over_tls(
    server: NBDServer, disk: shmdisk.Disk, pki: PKI, tmp_path: pytest.TempPathFactory
) -> None:
    """nbdinfo, nbdcopy (in and out), qemu-img convert and qemu-io all work over TLS with a
    client certificate; the server logs who the certificate says the client is."""
    uri = nbds(server, disk.name, pki.client)
    info = json.loads(ok("nbdinfo", "--json", uri))
    assert info["TLS"] is True and info["exports"][0]["export-size"] == 4 * MiB
    src = os.path.join(str(tmp_path), "in.img")
    data = os.urandom(MiB)
    with open(src, "wb") as f:
        f.write(data)
    ok("nbdcopy", src, uri)
    out = os.path.join(str(tmp_path), "out.img")
    ok("nbdcopy", uri, out)
    with open(out, "rb") as f:
        assert f.read(MiB) == data
    ok("qemu-io", *qemu_opts(server, disk.name, pki.client), "-c", "write -P 0x5a 2M 64k")
    converted = os.path.join(str(tmp_path), "q.img")
    ok("qemu-img", "convert", *qemu_opts(server, disk.name, pki.client), "-O", "raw", converted)
    with open(converted, "rb") as f:
        assert f.read(MiB) == data
        f.seek(2 * MiB)
        assert f.read(64 * 1024) == b"\x5a" * 64 * 1024
    got = bytearray(MiB)
    disk.read(0, got)
    assert got == data


@need("nbdinfo", "qemu-img")
def test_plain_clients_are_refused_by_a_tls_only_server(
    server: NBDServer, disk: shmdisk.Disk, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    """Without TLS, nbdinfo and qemu-img get nothing (every option is ERR_TLS_REQD)."""
    assert run("nbdinfo", f"nbd://127.0.0.1:{port_of(server)}/{disk.name}").returncode != 0
    plain = f"driver=nbd,host=127.0.0.1,port={port_of(server)},export={disk.name}"
    assert run("qemu-img", "info", "--image-opts", plain).returncode != 0
    assert "export '" not in caplog.text  # no connection ever got an export
    ok("nbdinfo", "--size", nbds(server, disk.name, pki.client))  # and TLS still works


@need("nbdinfo")
def test_a_client_checking_with_another_ca_refuses_the_server(
    server: NBDServer, disk: shmdisk.Disk, pki: PKI
) -> None:
    """A client whose CA did not sign the server's certificate refuses it."""
    done = run("nbdinfo", "--size", nbds(server, disk.name, pki.wrong_ca))
    assert done.returncode != 0 and "certificate" in done.stderr.lower()


@need("nbdinfo", "qemu-img")
def test_clients_without_a_certificate_of_the_ca_are_refused(
    server: NBDServer, disk: shmdisk.Disk, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    """--tls-verify-peer: a client certificate signed by another CA, or none at all, ends
    the connection in the TLS handshake (logged in one line each), for libnbd and qemu."""
    assert run("nbdinfo", "--size", nbds(server, disk.name, pki.rogue_client)).returncode != 0
    assert run("nbdinfo", "--size", nbds(server, disk.name, pki.anonymous)).returncode != 0
    done = run("qemu-img", "info", *qemu_opts(server, disk.name, pki.rogue_client))
    assert done.returncode != 0
    failures = [r for r in caplog.records if "TLS handshake failed" in r.getMessage()]
    assert len(failures) >= 3, caplog.text
    assert "Traceback" not in caplog.text
    ok("nbdinfo", "--size", nbds(server, disk.name, pki.client))


@need("nbdinfo")
def test_without_verify_peer_any_client_gets_an_encrypted_session(
    pki: PKI, disk: shmdisk.Disk
) -> None:
    """Without --tls-verify-peer a client presenting no certificate is served over TLS."""
    with NBDServer([disk], host="127.0.0.1", port=0, tls_certificates=pki.server) as srv:
        info = json.loads(ok("nbdinfo", "--json", nbds(srv, disk.name, pki.anonymous)))
        assert info["TLS"] is True


@need("nbdinfo")
def test_tls_on_lets_each_client_choose(
    pki: PKI, disk: shmdisk.Disk, caplog: pytest.LogCaptureFixture
) -> None:
    """--tls on: plain and TLS clients are both served (with the plain-TCP warning logged)."""
    with NBDServer([disk], host="127.0.0.1", port=0, tls="on", tls_certificates=pki.server) as srv:
        plain = json.loads(ok("nbdinfo", "--json", f"nbd://127.0.0.1:{port_of(srv)}/{disk.name}"))
        assert plain["TLS"] is False
        assert json.loads(ok("nbdinfo", "--json", nbds(srv, disk.name, pki.client)))["TLS"] is True
    assert "plain TCP to clients that do not ask for TLS" in caplog.text


@need("nbdinfo")
def test_tls_over_a_unix_socket(pki: PKI, disk: shmdisk.Disk) -> None:
    """nbds+unix works when a Unix socket requires TLS; a plain client there is refused."""
    d = tempfile.mkdtemp(prefix="nbdtu", dir="/tmp")
    try:
        path = os.path.join(d, "s")
        with NBDServer([disk], socket_path=path, tls="require", tls_certificates=pki.server) as srv:
            uri = f"nbds+unix:///{disk.name}?socket={path}&tls-certificates={pki.client}"
            assert json.loads(ok("nbdinfo", "--json", uri))["TLS"] is True
            assert srv.uri() == f"nbds+unix:///{disk.name}?socket={path}"
            plain = f"nbd+unix:///{disk.name}?socket={path}"
            assert run("nbdinfo", "--size", plain).returncode != 0
    finally:
        shutil.rmtree(d, ignore_errors=True)


@need("nbdinfo")
def test_serve_command_over_tls(pki: PKI, disk: shmdisk.Disk) -> None:
    """`shmdisk serve --bind 127.0.0.1:0 --tls-certificates DIR --tls-verify-peer` serves
    nbds:// clients and no plain ones, without the plain-TCP warning."""
    serve = Serve(
        disk.name, "--bind", "127.0.0.1:0", "--tls-certificates", pki.server, "--tls-verify-peer"
    )
    try:
        port = int(serve.wait_for(r"on 127\.0\.0\.1:(\d+) \(TLS require\)").group(1))
        uri = f"nbds://localhost:{port}/{disk.name}?tls-certificates={pki.client}"
        assert json.loads(ok("nbdinfo", "--json", uri))["exports"][0]["export-size"] == 4 * MiB
        assert run("nbdinfo", f"nbd://127.0.0.1:{port}/{disk.name}").returncode != 0
        serve.wait_for(r"TLS as CN=client\.example")
    finally:
        assert serve.stop() == 0
    assert "warning: serving plain" not in serve.log


# --- the protocol, as an attacker would try it -----------------------------------------------


def test_forced_tls_answers_every_option_with_tls_reqd_until_starttls(
    server: NBDServer, disk: shmdisk.Disk, pki: PKI
) -> None:
    """Before STARTTLS: LIST, INFO, GO, STRUCTURED_REPLY, meta contexts and unknown options
    get ERR_TLS_REQD; after it everything works, and a second STARTTLS is ERR_INVALID."""
    c = tcp_client(server)
    try:
        c.greet()
        for option in (P.OPT_LIST, P.OPT_STRUCTURED_REPLY, P.OPT_LIST_META_CONTEXT, 99):
            c.option(option)
            assert c.reply(option)[0] == P.REP_ERR_TLS_REQD
        for option in (P.OPT_INFO, P.OPT_GO):
            assert [k for k, _ in c.go(disk.name, option=option)] == [P.REP_ERR_TLS_REQD]
        starttls(c, client_context(pki))
        c.option(P.OPT_LIST)
        assert [k for k, _ in c.replies(P.OPT_LIST)] == [P.REP_SERVER, P.REP_ACK]
        c.option(P.OPT_STARTTLS)
        assert c.reply(P.OPT_STARTTLS)[0] == P.REP_ERR_INVALID
        c.go(disk.name)
        assert c.write(0, b"T" * 512) == 0
        assert c.read(0, 512) == b"T" * 512
    finally:
        c.close()


def test_export_name_before_starttls_ends_the_connection(server: NBDServer) -> None:
    """NBD_OPT_EXPORT_NAME cannot be answered with an error: a TLS-only server hangs up."""
    c = tcp_client(server)
    try:
        c.greet()
        c.option(P.OPT_EXPORT_NAME, b"")
        assert c.closed_by_server()
    finally:
        c.close()


def test_starttls_with_data_is_invalid_and_talk_goes_on(server: NBDServer, pki: PKI) -> None:
    """STARTTLS carrying a payload is ERR_INVALID; a proper one afterwards still works."""
    c = tcp_client(server)
    try:
        c.greet()
        c.option(P.OPT_STARTTLS, b"junk")
        assert c.reply(P.OPT_STARTTLS)[0] == P.REP_ERR_INVALID
        starttls(c, client_context(pki))
        assert c.go()[-1][0] == P.REP_ACK
    finally:
        c.close()


def test_what_was_negotiated_in_plain_text_is_forgotten(pki: PKI, disk: shmdisk.Disk) -> None:
    """--tls on: structured replies and base:allocation chosen before STARTTLS do not carry
    over (a man in the middle may have chosen them): simple replies, no block status."""
    with NBDServer([disk], host="127.0.0.1", port=0, tls="on", tls_certificates=pki.server) as srv:
        c = tcp_client(srv)
        try:
            c.greet()
            c.option(P.OPT_STRUCTURED_REPLY)
            assert c.reply(P.OPT_STRUCTURED_REPLY)[0] == P.REP_ACK
            c.structured = True
            assert c.set_meta(disk.name, [P.META_BASE_ALLOCATION])[-1][0] == P.REP_ACK
            starttls(c, client_context(pki))
            c.structured = False
            _size, flags = info_export(c.go(disk.name))
            assert not flags & P.FLAG_SEND_DF  # only offered with structured replies
            assert c.read(0, 512) == bytes(512)  # a simple reply
            handle = c.request(P.CMD_BLOCK_STATUS, 0, 512)
            assert c.simple(handle)[0] == P.EINVAL
        finally:
            c.close()


def test_plain_text_sent_behind_starttls_is_never_taken_as_an_option(
    server: NBDServer, disk: shmdisk.Disk
) -> None:
    """A LIST pipelined in plain text right after STARTTLS (the STARTTLS injection attack) is
    fed to the TLS handshake, which fails: no plain-text answer, the connection ends."""
    c = tcp_client(server)
    try:
        c.greet()
        c.sock.sendall(
            P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_STARTTLS, 0)
            + P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_LIST, 0)
        )
        assert c.reply(P.OPT_STARTTLS)[0] == P.REP_ACK
        rest = b""
        try:
            while chunk := c.sock.recv(4096):
                rest += chunk
        except ConnectionResetError:
            pass
        assert disk.name.encode() not in rest
        assert P.REPLY_MAGIC.to_bytes(8, "big") not in rest
    finally:
        c.close()


def test_clients_that_drop_without_a_tls_close_do_not_disturb_the_server(
    server: NBDServer, disk: shmdisk.Disk, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    """Hang-ups mid-handshake, mid-negotiation and mid-request, none with close_notify, each
    end their own connection with a log line; a client after them is served."""
    caplog.set_level(logging.INFO, logger="shmdisk.nbd")
    # Mid-handshake: half a ClientHello, then gone.
    c = tcp_client(server)
    c.greet()
    c.option(P.OPT_STARTTLS)
    assert c.reply(P.OPT_STARTTLS)[0] == P.REP_ACK
    c.sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    c.close()
    # After the handshake, mid-negotiation and mid-request: cut the socket under TLS.
    for mid_request in (False, True):
        c = tcp_client(server)
        c.greet()
        starttls(c, client_context(pki))
        if mid_request:
            c.go(disk.name)
            header = P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 4096)
            c.sock.sendall(header + b"x" * 100)  # 100 of the 4096 payload bytes
        socket.socket.shutdown(c.sock, socket.SHUT_RDWR)  # the descriptor, no TLS alert
        c.close()
    deadline = time.monotonic() + TIMEOUT
    while server.connections() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.connections() == 0
    c = tcp_client(server)
    try:
        c.greet()
        starttls(c, client_context(pki))
        c.go(disk.name)
        assert c.read(0, 512) == bytes(512)
    finally:
        c.close()
    assert "server bug" not in caplog.text and "Traceback" not in caplog.text
    assert caplog.text.count("closed (") >= 3


def test_stop_ends_tls_connections_promptly(pki: PKI, disk: shmdisk.Disk) -> None:
    """stop() with a client in a TLS session: its request is answered, the client sees the
    end, and stop returns at once rather than after its timeout."""
    srv = NBDServer([disk], host="127.0.0.1", port=0, tls_certificates=pki.server).start()
    c = tcp_client(srv)
    try:
        c.greet()
        starttls(c, client_context(pki))
        c.go(disk.name)
        assert c.write(0, b"S" * 512) == 0
        start = time.monotonic()
        srv.stop()
        assert time.monotonic() - start < 5.0
        assert c.closed_by_server()
    finally:
        c.close()
        srv.stop()


def test_starttls_is_policy_refused_when_tls_is_off(pki: PKI, disk: shmdisk.Disk) -> None:
    """tls="off" with certificates at hand: STARTTLS is ERR_POLICY, plain talk goes on."""
    d = tempfile.mkdtemp(prefix="nbdto", dir="/tmp")
    try:
        path = os.path.join(d, "s")
        with NBDServer([disk], socket_path=path, tls="off", tls_certificates=pki.server):
            c = Client(path)
            try:
                c.greet()
                c.option(P.OPT_STARTTLS)
                assert c.reply(P.OPT_STARTTLS)[0] == P.REP_ERR_POLICY
                assert c.go()[-1][0] == P.REP_ACK
            finally:
                c.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --- configuration ---------------------------------------------------------------------------


def test_tcp_without_tls_credentials_refuses_to_start(disk: shmdisk.Disk) -> None:
    """A TCP server with no certificates and no explicit --tls off does not start, and says
    what to pass; nothing was listening meanwhile."""
    srv = NBDServer([disk], host="127.0.0.1", port=0)
    with pytest.raises(TLSConfigError, match=r"--tls-certificates DIR.*--tls off"):
        srv.start()
    assert srv.connections() == 0 and not srv._listeners


def test_serve_command_over_tcp_needs_tls_or_tls_off() -> None:
    """`shmdisk serve NAME --create --bind ...` without TLS: one error line, exit 1, and the
    disk was not even created."""
    name = new_name("nbdtcp")
    done = subprocess.run(
        [*SERVE_CMD, name, "--create", "--bind", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("shmdisk serve: error: TCP clients must use TLS")
    assert done.stderr.count("\n") == 1
    assert name not in shmdisk.list_disks()


def test_plain_tcp_on_every_interface_warns_about_other_hosts(disk: shmdisk.Disk) -> None:
    """--tls off on 0.0.0.0: the warning names other hosts, not only local users."""
    serve = Serve(disk.name, "--bind", "0.0.0.0:0", "--tls", "off")
    try:
        serve.wait_for("serving")
    finally:
        assert serve.stop() == 0
    assert "warning: serving plain TCP on 0.0.0.0:" in serve.log
    assert "any local user and any host that can reach it" in serve.log


@pytest.mark.parametrize(
    ("setup", "options", "message"),
    [
        ("nothing", {"tls_certificates": "{d}/missing"}, "not a directory"),
        ("no-key", {"tls_certificates": "{d}"}, "missing server-key.pem"),
        ("no-ca", {"tls_certificates": "{d}", "tls_verify_peer": True}, "missing ca-cert.pem"),
        ("mismatch", {"tls_certificates": "{d}"}, "cannot use server-cert.pem"),
        ("full", {"tls_certificates": "{d}", "tls_psk": "{d}/k"}, "not both"),
        ("nothing", {"tls_verify_peer": True}, "needs --tls-certificates"),
        ("nothing", {"tls": "on"}, "needs TLS credentials"),
    ],
)
def test_bad_tls_options_are_one_clear_error(
    pki: PKI, disk: shmdisk.Disk, setup: str, options: dict[str, object], message: str
) -> None:
    """Missing files, a key that does not match, conflicting options: TLSConfigError at
    start, saying what is wrong."""
    d = tempfile.mkdtemp(prefix="nbdtc")
    try:
        server_files = os.listdir(pki.server)
        if setup in ("no-key", "no-ca", "mismatch", "full"):
            left_out = {"no-key": "server-key.pem", "no-ca": "ca-cert.pem"}.get(setup)
            for f in server_files:
                if f != left_out:
                    shutil.copy(os.path.join(pki.server, f), d)
        if setup == "mismatch":
            shutil.copy(os.path.join(pki.client, "client-key.pem"), f"{d}/server-key.pem")
        kwargs = {k: v.format(d=d) if isinstance(v, str) else v for k, v in options.items()}
        sock = os.path.join(d, "s")
        srv = NBDServer([disk], socket_path=sock, **kwargs)  # type: ignore[arg-type]
        with pytest.raises(TLSConfigError, match=message):
            srv.start()
        assert not os.path.exists(sock)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@need("openssl")
def test_an_encrypted_server_key_is_refused_without_a_prompt(pki: PKI, disk: shmdisk.Disk) -> None:
    """A passphrase-protected server-key.pem is an error, never a prompt on the terminal."""
    d = tempfile.mkdtemp(prefix="nbdtk")
    try:
        for f in ("server-cert.pem", "ca-cert.pem"):
            shutil.copy(os.path.join(pki.server, f), d)
        subprocess.run(
            ["openssl", "pkey", "-in", os.path.join(pki.server, "server-key.pem"), "-aes256",
             "-passout", "pass:secret", "-out", os.path.join(d, "server-key.pem")],
            check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=TIMEOUT,
        )  # fmt: skip
        srv = NBDServer([disk], socket_path=os.path.join(d, "s"), tls_certificates=d)
        with pytest.raises(TLSConfigError, match="encrypted"):
            srv.start()
    finally:
        shutil.rmtree(d, ignore_errors=True)


@need("openssl", "nbdinfo")
def test_certificates_made_with_openssl_work_too(disk: shmdisk.Disk) -> None:
    """The same layout made by openssl instead of certtool serves nbdinfo over TLS."""
    d = tempfile.mkdtemp(prefix="nbdtossl")
    try:
        make_with_openssl(d)
        made = lay_out(d)
        with NBDServer(
            [disk], host="127.0.0.1", port=0, tls_certificates=made.server, tls_verify_peer=True
        ) as srv:
            ok("nbdinfo", "--size", nbds(srv, disk.name, made.client))
            assert run("nbdinfo", "--size", nbds(srv, disk.name, made.rogue_client)).returncode
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --- pre-shared keys -------------------------------------------------------------------------


def test_psk_files_parse_as_psktool_writes_them() -> None:
    """user:hexkey lines, blank lines ignored; anything else names its line."""
    keys = parse_psk_file("alice:00ff10\n\nbob:abcdef\n")
    assert keys == {"alice": b"\x00\xff\x10", "bob": b"\xab\xcd\xef"}
    for bad, what in (("alice", "line 1"), ("alice:xyz", "not hexadecimal"), ("", "no keys"),
                      ("a:00\n:00", "line 2"), ("a:", "empty key")):  # fmt: skip
        with pytest.raises(TLSConfigError, match=what):
            parse_psk_file(bad)


@pytest.mark.skipif(psk_supported(), reason="this Python's ssl serves pre-shared keys")
def test_psk_without_support_is_a_clear_error(
    disk: shmdisk.Disk, tmp_path: pytest.TempPathFactory
) -> None:
    """Before Python 3.13 --tls-psk is refused at start, saying what is needed instead."""
    keys = os.path.join(str(tmp_path), "keys.psk")
    with open(keys, "w") as f:
        f.write("alice:" + "ab" * 32 + "\n")
    srv = NBDServer([disk], host="127.0.0.1", port=0, tls_psk=keys)
    with pytest.raises(TLSConfigError, match=r"needs Python 3\.13.*--tls-certificates"):
        srv.start()
    done = subprocess.run(
        [*SERVE_CMD, disk.name, "--bind", "127.0.0.1:0", "--tls-psk", keys],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "--tls-psk needs Python 3.13" in done.stderr


@pytest.mark.skipif(not psk_supported(), reason="this Python's ssl cannot serve PSK (3.13+)")
@need("nbdinfo", "psktool")
def test_psk_clients_with_the_key_are_served_and_others_not(
    disk: shmdisk.Disk, tmp_path: pytest.TempPathFactory
) -> None:
    """A psktool key file: alice with her key is served over TLS; a wrong key is refused."""
    keys = os.path.join(str(tmp_path), "keys.psk")
    subprocess.run(["psktool", "-u", "alice", "-p", keys], check=True, capture_output=True)
    wrong = os.path.join(str(tmp_path), "wrong.psk")
    subprocess.run(["psktool", "-u", "alice", "-p", wrong], check=True, capture_output=True)
    with NBDServer([disk], host="127.0.0.1", port=0, tls_psk=keys) as srv:
        base = f"nbds://alice@localhost:{port_of(srv)}/{disk.name}?tls-psk-file="
        ok("nbdinfo", "--size", base + keys)
        assert run("nbdinfo", "--size", base + wrong).returncode != 0


def test_tls_identity_reaches_the_access_policy(pki: PKI, disk: shmdisk.Disk) -> None:
    """The policy sees peer.tls and the verified certificate's subject, and can act on them."""
    from shmdisk.nbd import Access, Peer

    seen: list[Peer] = []

    def policy(export: str, peer: Peer) -> Access:
        seen.append(peer)
        return Access.READ_ONLY if peer.tls_identity == "CN=client.example" else Access.REFUSED

    with NBDServer(
        [disk], host="127.0.0.1", port=0, tls_certificates=pki.server, tls_verify_peer=True,
        access=policy,
    ) as srv:  # fmt: skip
        c = tcp_client(srv)
        try:
            c.greet()
            starttls(c, client_context(pki))
            _size, flags = info_export(c.go(disk.name))
            assert flags & P.FLAG_READ_ONLY
        finally:
            c.close()
    assert seen and seen[-1].tls and seen[-1].tls_identity == "CN=client.example"
