//! Clients that send request bytes exactly as given: HTTP/2 (h2c, prior
//! knowledge) and a raw HTTP/1.1 exchange. hyper and h2 validate `:path` and header values before sending, so they
//! cannot send what an attacker sends; Envoy's HTTP/2 codec passes bytes its
//! HTTP/1.1 codec refuses (e.g. 0x80-0xFF in `:path`), and the modules must judge
//! those bytes themselves.
//!
//! One request per connection: preface, SETTINGS, one HEADERS frame (HPACK
//! literals without indexing or Huffman, so every byte goes out as written),
//! optional DATA, then frames are read until the stream ends. Responses are decoded
//! with the `hpack` crate (Envoy uses Huffman coding and the dynamic table).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::Response;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
const STREAM: u32 = 1;

/// How the exchange ended when no response arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawOutcome {
    Response(Response),
    /// The server reset the stream (RST_STREAM error code).
    Reset(u32),
    /// The server closed the connection (GOAWAY error code).
    GoAway(u32),
    /// The connection ended before the stream did.
    Closed,
}

impl RawOutcome {
    pub fn response(self) -> Response {
        match self {
            RawOutcome::Response(response) => response,
            other => panic!("expected a response, got {other:?}"),
        }
    }
}

/// One raw HTTP/2 request: every header (pseudo-headers included) is sent as the
/// exact bytes given, in order.
pub fn send(addr: SocketAddr, headers: &[(&[u8], &[u8])], body: &[u8]) -> RawOutcome {
    let owned: Vec<(Vec<u8>, Vec<u8>)> = headers.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
    let body = body.to_vec();
    crate::runtime().block_on(async move {
        match tokio::time::timeout(Duration::from_secs(10), exchange(addr, owned, body)).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(error)) => panic!("raw h2 exchange failed: {error}"),
            Err(_) => panic!("raw h2: no response within 10 s"),
        }
    })
}

/// A GET with the given raw `:path` and extra headers; `:authority` is `gateway.test`.
pub fn get(addr: SocketAddr, path: &[u8], extra: &[(&[u8], &[u8])]) -> RawOutcome {
    let mut headers: Vec<(&[u8], &[u8])> =
        vec![(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"gateway.test"), (b":path", path)];
    headers.extend_from_slice(extra);
    send(addr, &headers, b"")
}

/// Writes `request` (a whole HTTP/1.1 request, any bytes) and returns the
/// response status (0 when the connection closed without one).
pub fn http1_status(addr: SocketAddr, request: &[u8]) -> u16 {
    let request = request.to_vec();
    crate::runtime().block_on(async move {
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
            stream.write_all(&request).await?;
            let mut head = Vec::new();
            let mut buffer = [0u8; 1024];
            while !head.windows(2).any(|w| w == b"\r\n") {
                let read = stream.read(&mut buffer).await?;
                if read == 0 {
                    break;
                }
                head.extend_from_slice(&buffer[..read]);
            }
            Ok::<_, std::io::Error>(head)
        };
        let head =
            tokio::time::timeout(Duration::from_secs(10), exchange).await.expect("raw h1 answer").unwrap_or_default();
        let line = String::from_utf8_lossy(&head);
        line.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0)
    })
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).expect("frame fits");
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&length.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// RFC 7541 5.1 integer with an N-bit prefix; `first` carries the pattern bits.
fn hpack_integer(out: &mut Vec<u8>, first: u8, prefix_bits: u32, mut value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// "Literal header field without indexing, new name", no Huffman (RFC 7541 6.2.2).
fn hpack_literals(headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in headers {
        block.push(0x00);
        hpack_integer(&mut block, 0x00, 7, name.len());
        block.extend_from_slice(name);
        hpack_integer(&mut block, 0x00, 7, value.len());
        block.extend_from_slice(value);
    }
    block
}

async fn exchange(
    addr: SocketAddr,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    body: Vec<u8>,
) -> Result<RawOutcome, Box<dyn std::error::Error + Send + Sync>> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, b""));
    let flags = if body.is_empty() { END_HEADERS | END_STREAM } else { END_HEADERS };
    out.extend(frame(HEADERS, flags, STREAM, &hpack_literals(&headers)));
    if !body.is_empty() {
        out.extend(frame(DATA, END_STREAM, STREAM, &body));
    }
    stream.write_all(&out).await?;

    let mut decoder = hpack::Decoder::new();
    let mut block = Vec::new();
    let mut response_headers: Vec<(String, Vec<u8>)> = Vec::new();
    let mut status = None;
    let mut response_body = Vec::new();
    loop {
        let mut head = [0u8; 9];
        if stream.read_exact(&mut head).await.is_err() {
            return Ok(RawOutcome::Closed);
        }
        let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream_id = u32::from_be_bytes([head[5] & 0x7f, head[6], head[7], head[8]]);
        let mut payload = vec![0u8; length];
        stream.read_exact(&mut payload).await?;
        match kind {
            SETTINGS if flags & ACK == 0 => stream.write_all(&frame(SETTINGS, ACK, 0, b"")).await?,
            PING if flags & ACK == 0 => stream.write_all(&frame(PING, ACK, 0, &payload)).await?,
            GOAWAY => {
                let code = payload.get(4..8).map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                return Ok(RawOutcome::GoAway(code));
            }
            RST_STREAM if stream_id == STREAM => {
                let code = payload.get(..4).map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                return Ok(RawOutcome::Reset(code));
            }
            HEADERS | CONTINUATION if stream_id == STREAM => {
                let mut fragment = payload.as_slice();
                if kind == HEADERS {
                    let pad = if flags & PADDED != 0 { usize::from(fragment[0]) } else { 0 };
                    if flags & PADDED != 0 {
                        fragment = &fragment[1..];
                    }
                    if flags & PRIORITY != 0 {
                        fragment = &fragment[5..];
                    }
                    fragment = &fragment[..fragment.len() - pad];
                }
                block.extend_from_slice(fragment);
                if flags & END_HEADERS != 0 {
                    let decoded = decoder.decode(&block).map_err(|error| format!("hpack: {error:?}"))?;
                    block.clear();
                    for (name, value) in decoded {
                        if name == b":status" {
                            status = Some(String::from_utf8_lossy(&value).parse::<u16>()?);
                        } else if status.is_some() && !name.starts_with(b":") {
                            response_headers.push((String::from_utf8_lossy(&name).into_owned(), value));
                        }
                    }
                }
                if flags & END_STREAM != 0 {
                    break;
                }
            }
            DATA if stream_id == STREAM => {
                let mut data = payload.as_slice();
                if flags & PADDED != 0 {
                    let pad = usize::from(data[0]);
                    data = &data[1..data.len() - pad];
                }
                response_body.extend_from_slice(data);
                if length > 0 {
                    // Give the window back so large bodies keep flowing.
                    let increment = u32::try_from(length)?.to_be_bytes();
                    stream.write_all(&frame(WINDOW_UPDATE, 0, 0, &increment)).await?;
                    stream.write_all(&frame(WINDOW_UPDATE, 0, STREAM, &increment)).await?;
                }
                if flags & END_STREAM != 0 {
                    break;
                }
            }
            _ => {}
        }
    }
    let status = status.ok_or("response without :status")?;
    Ok(RawOutcome::Response(Response { status, headers: response_headers, body: response_body }))
}
