#!/usr/bin/env python3
"""Writes the hand-made seed inputs into corpus/<target>/seed-*.

Run from fuzz/: `python3 seeds/gen.py`. The seeds say what each target is meant to reach
(valid MQTT 3.1.1 and 5 sessions, telemetry samples, selectors, policies); the fuzzer grows the
rest, and `cargo fuzz cmin` keeps the committed corpora small.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "corpus")


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# --- MQTT encoding -------------------------------------------------------------------------

def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def s(text):
    b = text.encode() if isinstance(text, str) else text
    return struct.pack(">H", len(b)) + b


def packet(first, body):
    return bytes([first]) + varint(len(body)) + body


def props(*ps):
    body = b"".join(ps)
    return varint(len(body)) + body


def u16(n):
    return struct.pack(">H", n)


def u32(n):
    return struct.pack(">I", n)


def connect(client_id, v5, clean=True, keepalive=60, will=None, user=None, password=None,
            cprops=b"", wprops=b""):
    flags = 0x02 if clean else 0
    payload = s(client_id)
    if will:
        topic, msg, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += (props(wprops) if v5 else b"") + s(topic) + s(msg)
    if user is not None:
        flags |= 0x80
        payload += s(user)
    if password is not None:
        flags |= 0x40
        payload += s(password)
    body = s("MQTT") + bytes([5 if v5 else 4, flags]) + u16(keepalive)
    if v5:
        body += props(cprops)
    return packet(0x10, body + payload)


def publish(topic, payload, v5, qos=0, pid=1, retain=False, dup=False, pprops=b""):
    first = 0x30 | (qos << 1) | (1 if retain else 0) | (0x08 if dup else 0)
    body = s(topic) + (u16(pid) if qos else b"") + (props(pprops) if v5 else b"")
    return packet(first, body + (payload.encode() if isinstance(payload, str) else payload))


def subscribe(filters, v5, pid=1, sprops=b""):
    body = u16(pid) + (props(sprops) if v5 else b"")
    for f, opts in filters:
        body += s(f) + bytes([opts])
    return packet(0x82, body)


def unsubscribe(filters, v5, pid=1):
    body = u16(pid) + (props() if v5 else b"")
    for f in filters:
        body += s(f)
    return packet(0xA2, body)


def ack(kind, pid):
    first = {"puback": 0x40, "pubrec": 0x50, "pubrel": 0x62, "pubcomp": 0x70}[kind]
    return packet(first, u16(pid))


PINGREQ = packet(0xC0, b"")
DISCONNECT = packet(0xE0, b"")
TELEMETRY = '{"seq":1,"ts":1700000000000,"temp":21.5,"battery":{"v":3.7}}'

# Scenario byte (see fuzz_targets/broker_connection.rs).
RAW, V311, V5, V5_SMALL = 0, 1, 2, 3
PERSISTENT, DEVICE, SPLIT, CONCURRENT, SUBSCRIBER = 0x04, 0x08, 0x10, 0x20, 0x40


def broker(name, mode, *packets):
    write("broker_connection", name, bytes([mode]) + b"".join(packets))


def session(v5):
    return [
        subscribe([("a/#", 1), ("devices/+/telemetry", 2)], v5),
        publish("a/b", "hello", v5),
        publish("a/b", "one", v5, qos=1, pid=2),
        publish("a/c", "two", v5, qos=2, pid=3),
        ack("pubrel", 3),
        publish("devices/d1/telemetry", TELEMETRY, v5, qos=1, pid=4),
        publish("devices/d1/telemetry", "not json", v5, qos=1, pid=5),
        publish("r/x", "kept", v5, retain=True),
        subscribe([("r/#", 0)], v5, pid=6),
        unsubscribe(["a/#"], v5, pid=7),
        PINGREQ,
        DISCONNECT,
    ]


for v5, mode, tag in [(False, V311, "v311"), (True, V5, "v5")]:
    broker(f"{tag}-session", mode, *session(v5))
    broker(f"{tag}-session-subscriber", mode | SUBSCRIBER, *session(v5))
    broker(f"{tag}-persistent-resume", mode | PERSISTENT | SPLIT, bytes([128]),
           subscribe([("q/#", 2)], v5), publish("q/1", "x", v5, qos=2, pid=9),
           publish("q/2", "y", v5, qos=1, pid=10))
    broker(f"{tag}-takeover", mode | PERSISTENT | SPLIT | CONCURRENT, bytes([100]),
           subscribe([("t/#", 1)], v5), publish("t/1", "x", v5, qos=1, pid=1), PINGREQ)
    broker(f"{tag}-device-policy", mode | DEVICE,
           subscribe([("devices/d1/#", 1), ("devices/+/x", 1), ("sites/s1/+/#", 0),
                      ("evil/x/+/x", 0), ("fleet/broadcast/#", 0)], v5),
           publish("devices/d1/telemetry", TELEMETRY, v5, qos=1, pid=2),
           publish("devices/d2/telemetry", TELEMETRY, v5, qos=1, pid=3),
           publish("sites/s1/door/open", "1", v5, qos=2, pid=4), ack("pubrel", 4))
    broker(f"{tag}-slow-acks", mode,
           *[publish("slow/x", str(i), v5, qos=1 + i % 2, pid=i + 1) for i in range(6)],
           *[ack("pubrel", i + 1) for i in range(1, 6, 2)])
    broker(f"{tag}-verdict-disconnect", mode,
           publish("verdict/disconnect", "x", v5, qos=1, pid=1))
    broker(f"{tag}-idle", mode)

# v5 only: properties, topic aliases, flow control, reason codes.
full_props = (b"\x01\x01" + b"\x02" + u32(60) + b"\x03" + s("text/plain") + b"\x08" + s("resp/x")
              + b"\x09" + s(b"\x00\x01") + b"\x26" + s("k") + s("v"))
broker("v5-publish-properties", V5_SMALL | SUBSCRIBER,
       subscribe([("p/#", 2 | 0x04 | 0x08)], True, sprops=b"\x0b\x07"),
       publish("p/1", "props", True, qos=1, pid=1, pprops=full_props),
       publish("p/2", "a" * 300, True, qos=1, pid=2))
broker("v5-topic-alias", V5_SMALL,
       subscribe([("al/#", 1)], True),
       publish("al/x", "first", True, pprops=b"\x23" + u16(1)),
       publish("", "by alias", True, pprops=b"\x23" + u16(1)),
       publish("", "unknown alias", True, pprops=b"\x23" + u16(9)))
broker("v5-retain-handling", V5,
       publish("rh/1", "kept", True, retain=True),
       subscribe([("rh/#", 1 | 0x10)], True, pid=2),
       subscribe([("rh/#", 1 | 0x20)], True, pid=3),
       publish("rh/1", "", True, retain=True))
broker("v5-disconnect-with-will", RAW,
       connect("w1", True, will=("will/t", "gone", 1, True), wprops=b"\x18" + u32(5),
               cprops=b"\x11" + u32(60)),
       packet(0xE0, b"\x04" + props(b"\x11" + u32(30))))
broker("v5-auth-packet", V5, packet(0xF0, b"\x18" + props(b"\x15" + s("x"))))
broker("v5-receive-maximum-flood", V5 | SUBSCRIBER,
       *[publish("f/x", "m", True, qos=1, pid=i + 1) for i in range(40)])

# Raw: the fuzzer owns the CONNECT.
broker("raw-v311-will-userpass", RAW,
       connect("w3", False, will=("will/x", "bye", 2, True), user="u", password="p"),
       publish("a", "x", False))
broker("raw-v311-wrong-password", RAW, connect("c1", False, user="u", password="wrong"))
broker("raw-v5-refused", RAW, connect("c1", True, user="refuse"))
broker("raw-v5-rename", RAW, connect("c9", True, user="rename"),
       subscribe([("x", 0)], True))
broker("raw-v5-empty-client-id", RAW, connect("", True, keepalive=0), PINGREQ)
broker("raw-v5-connect-props", RAW,
       connect("c1", True, cprops=b"\x11" + u32(0xFFFFFFFF) + b"\x21" + u16(1) + b"\x27" + u32(64)
               + b"\x22" + u16(3) + b"\x19\x01" + b"\x17\x00" + b"\x26" + s("a") + s("b")))
broker("raw-v311-no-connect", RAW, PINGREQ, publish("a", "x", False))
broker("raw-v311-connect-twice", RAW, connect("c1", False), connect("c1", False))
broker("raw-v31-mqisdp", RAW,
       packet(0x10, s("MQIsdp") + bytes([3, 0x02]) + u16(10) + s("old")))

# --- telemetry ---------------------------------------------------------------------------------

for name, text in [
    ("readme", '{"temp": 21.5, "battery": {"v": 3.7}}'),
    ("seq-ts", TELEMETRY),
    ("bools-ignored", '{"ok":true,"name":"x","list":[1,2],"nothing":null,"n":-0.0}'),
    ("nested", '{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":1}}}}}}}}'),
    ("dup-names", '{"a.b":1,"a":{"b":2}}'),
    ("big-numbers", '{"x":1e308,"y":-1.7976931348623157e308,"z":18446744073709551615,"w":1e-320}'),
    ("bad-seq", '{"seq":-1,"ts":"now"}'),
    ("unicode", '{"t\\u00e9mp\\ud83d\\ude00":1,"\\u0000":2}'),
    ("empty", "{}"),
    ("not-object", "[1,2,3]"),
]:
    write("telemetry_parse", name, text)

# --- selectors ---------------------------------------------------------------------------------

for name, text in [
    ("online", "online"),
    ("tag", "tag:site=berlin"),
    ("version", "version=1.4.0"),
    ("ids", "d1,d2,d3"),
    ("id-prefix", "id:online"),
    ("all-terms", "tag:site=berlin and version=1.3.2 and online and id:d1,d2"),
    ("contradiction", "d1 and d2 and tag:a=1 and tag:a=2"),
    ("with-device", "tag:site=berlin and online\0" + "d1\0site\0berlin\0\x01"),
    ("bad", "tag:site=a/b and and"),
]:
    write("selector_parse", name, text)

# --- policies ----------------------------------------------------------------------------------

for name, text in [
    ("defaults", "pub devices/d1/telemetry\npub devices/d2/telemetry\nsub devices/d1/#\nsub #\n"),
    ("tag-site", "rule device both sites/{tag:site}/#\nas device d1 site=s1\n"
                 "pub sites/s1/door\npub sites/s2/door\nsub sites/+/door\nsub sites/s1/#\n"),
    ("tag-injection", "rule device both devices/{tag:peer}/#\nas device d1 peer=+ other=d2/x\n"
                      "pub devices/d2/telemetry\nsub devices/+/telemetry\n"),
    ("id-and-tag", "rule device subscribe {tag:site}/{id}/+/#\nrule service both cmd/#\n"
                   "as device d1 site=s1\nsub s1/d1/x/#\nsub s1/d1/#\npub s1/d1/x/y\n"),
    ("service", "as service pipe\nsub devices/+/telemetry\nsub #\npub devices/d1/commands/x\n"),
    ("dev", "as dev\npub anything\nsub #\n"),
    ("dollar", "rule device both #\nrule device subscribe +/x\npub $SYS/x\nsub $SYS/#\nsub +/x\n"),
    ("bad-pattern", "rule device both a/{nope}/#\nrule device both {tag:}\n"),
    ("shared", "rule device subscribe fleet/#\nas device d1\nsub $share/g/devices/d1/#\n"
               "sub $share/g/fleet/x\nsub $share/g/devices/+/telemetry\nsub $share/g+/devices/d1/x\n"
               "pub devices/d1/x\npub fleet/x\npub $share/g/devices/d1/x\n"),
    ("shared-service", "as service pipe\nsub $share/workers/devices/+/telemetry\nsub $share/w/#\n"
                       "pub devices/d1/telemetry\n"),
]:
    write("policy_eval", name, text)
