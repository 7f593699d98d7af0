"""PostgreSQL DSNs: the two forms libpq documents (a postgresql:// URI, and keyword=value pairs —
https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNSTRING), checked strictly
enough that what is shown of them can be taken from parsed parts only.

A DSN holds a password. Nothing here ever puts the DSN's text, or any part of it other than the
host names, ports and database name, into a message: a string that is not recognised is refused
with a reason, never repeated. A lenient parser would show a password that a typo moved into the
"host" or "database" position (`postgresql:/u:pw@h/db`, an unencoded `@` or `/` in a password), so
each shown part must look like what it claims to be.

asyncpg reads only the URI form: the keyword form is handed to it as the equivalent URI
(`postgresql://?host=…&dbname=…`, every keyword a query parameter asyncpg knows).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlencode

SCHEMES = ("postgresql://", "postgres://")
# Keywords of the keyword=value form that asyncpg also reads as URI query parameters. Others
# (hostaddr, options, connect_timeout, ...) would reach the server as settings and fail there.
KEYWORDS = frozenset(
    {
        "host",
        "port",
        "dbname",
        "user",
        "password",
        "passfile",
        "sslmode",
        "sslcert",
        "sslkey",
        "sslrootcert",
        "sslcrl",
        "sslpassword",
        "sslnegotiation",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "target_session_attrs",
        "krbsrvname",
        "gsslib",
        "service",
    }
)
FORMS = "a postgresql:// (or postgres://) URL with a host, or libpq keyword=value pairs"
NOT_REPEATED = "its text is not repeated: it may hold a password"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,252}$")
_IPV6 = re.compile(r"^[0-9A-Fa-f:.]{2,45}$")
_SOCKET = re.compile(r"^/[A-Za-z0-9_./\-]{0,200}$")
_PORT = re.compile(r"^[0-9]{1,5}$")
_DATABASE = re.compile(r"^[A-Za-z0-9_.\-$%]{0,200}$")  # as written in a URL path: no '@', '/', ':'
_KEYWORD_START = re.compile(r"^[A-Za-z_]+\s*=")
_PAIR = re.compile(r"([A-Za-z_]+)\s*=\s*('(?:[^'\\]|\\.)*'|[^\s']*)")


@dataclass(frozen=True)
class Dsn:
    hosts: tuple[tuple[str, int], ...]
    database: str  # percent-encoded as in a URL path
    url: str  # what asyncpg is given
    has_password: bool

    def describe(self) -> str:
        """host:port[,host:port]/database — never the user, password or options."""
        where = ",".join(f"[{h}]:{p}" if ":" in h and h[0] not in "[/" else f"{h}:{p}" for h, p in self.hosts)
        return f"{where}/{self.database}" if self.database else where


def parse(text: str) -> Dsn:
    """The DSN's parts; ValueError (a reason that never quotes the DSN) when it is neither form."""
    text = text.strip()
    if not text:
        raise ValueError("is empty")
    if _KEYWORD_START.match(text):
        return _parse_keywords(text)
    if not text.lower().startswith(SCHEMES):
        raise ValueError(f"is not {FORMS} ({NOT_REPEATED})")
    return _parse_url(text)


def describe(text: str) -> str:
    """For messages: host:port/database of a DSN, or a placeholder; never any other part."""
    try:
        return parse(text).describe()
    except ValueError:
        return "(unparseable DSN)"


def _port(text: str) -> int:
    if not (_PORT.match(text) and 0 < int(text) < 65536):
        raise ValueError("has a port that is not a number from 1 to 65535")
    return int(text)


def _host(text: str, *, bare_ipv6: bool) -> str:
    if text[:3].lower() == "%2f":
        text = unquote(text)
    ok = (
        _NAME.match(text)
        or _SOCKET.match(text)
        or (
            _IPV6.match(text[1:-1])
            if text.startswith("[") and text.endswith("]")
            else bare_ipv6 and ":" in text and _IPV6.match(text)
        )
    )
    if not ok:
        raise ValueError(
            "has a host that is not a host name, address or socket directory "
            "(a password holding '@', ':', '/' or '#' must be percent-encoded)"
        )
    return text


def _hosts(hostspec: str, ports: str | None, *, in_url: bool) -> tuple[tuple[str, int], ...]:
    items = hostspec.split(",")
    port_list = ports.split(",") if ports else []
    if len(port_list) > 1 and len(port_list) != len(items):
        raise ValueError("lists a different number of ports than hosts")
    hosts = []
    for i, item in enumerate(items):
        host, port = item, ""
        if in_url:  # host:port, [v6]:port
            if item.startswith("["):
                host, _, rest = item.partition("]")
                host += "]"
                if rest and not rest.startswith(":"):
                    raise ValueError("has a host that is not a host name, address or socket directory")
                port = rest[1:]
            elif ":" in item:
                host, _, port = item.rpartition(":")
        if not port and port_list:
            port = port_list[i if len(port_list) > 1 else 0]
        hosts.append((_host(host, bare_ipv6=not in_url), _port(port) if port else 5432))
    return tuple(hosts)


def _parse_url(text: str) -> Dsn:
    rest = text.split("://", 1)[1]
    if "#" in rest:
        raise ValueError("has a '#' (a password holding '#' must be percent-encoded)")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, _, hostspec = netloc.rpartition("@")
    if "@" in userinfo:
        raise ValueError(
            "has more than one '@' before the host (a password holding '@' must be percent-encoded)"
        )
    try:
        named = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=True)) if query else {}
    except ValueError:
        raise ValueError("has a query that is not key=value pairs") from None
    if hostspec:
        hosts = _hosts(hostspec, named.get("port"), in_url=True)
    elif named.get("host"):
        hosts = _hosts(named["host"], named.get("port"), in_url=False)
    else:
        raise ValueError("has no host (postgresql://host[:port]/database)")
    if not _DATABASE.match(path):
        raise ValueError(
            "has a database name holding '/', '@' or ':' (a password holding them must be percent-encoded)"
        )
    database = path if slash and path else quote(named.get("dbname", named.get("database", "")), safe="$")
    return Dsn(hosts, database, text, ":" in userinfo or "password" in named)


def _parse_keywords(text: str) -> Dsn:
    pairs: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        match = _PAIR.match(text, pos)
        if match is None or (match.end() < len(text) and not text[match.end()].isspace()):
            raise ValueError(
                f"is not {FORMS}: keyword=value pairs separated by spaces, a value with spaces in "
                f"single quotes ({NOT_REPEATED})"
            )
        key, value = match.group(1), match.group(2)
        if key not in KEYWORDS:
            raise ValueError(
                f"uses a keyword that is not supported here; use only {', '.join(sorted(KEYWORDS))}"
            )
        if value.startswith("'"):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        pairs.append((key, value))
        pos = match.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    named = dict(pairs)
    if not named.get("host"):  # libpq would try a local socket: in a container, never the database
        raise ValueError("has no host (host=... port=... dbname=...)")
    hosts = _hosts(named["host"], named.get("port"), in_url=False)
    return Dsn(
        hosts,
        quote(named.get("dbname", ""), safe="$"),
        f"postgresql://?{urlencode(pairs)}",
        "password" in named,
    )
