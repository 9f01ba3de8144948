//! Bytes a client sends after the TLS handshake, through the sessions' own decoder: the
//! fixed-header check, CONNECT (3.1.1 and 5) and every packet after it.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        for max in [64, 65_536] {
            let _ = tms_broker::decode_client_stream(data, max);
        }
    });
}
