//! Bounded fuzzing of the helper's frame decoder (runs in CI): arbitrary bytes, arbitrary
//! headers and mutated valid frames never panic, never allocate past the limit, and valid
//! frames always round-trip.
#![allow(clippy::unwrap_used)]

use banger_proto::helper::{
    FrameError, HelperOp, HelperRequest, MAX_FRAME, read_frame, write_frame,
};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 2_000,
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    }
}

fn op() -> impl Strategy<Value = HelperOp> {
    prop_oneof![
        Just(HelperOp::Hello),
        Just(HelperOp::NetworkDown),
        Just(HelperOp::BindDns),
        any::<u32>().prop_map(|pool_size| HelperOp::NetworkUp { pool_size }),
        ".{0,40}".prop_map(|name| HelperOp::EnsureTap { name }),
        (".{0,40}", any::<bool>())
            .prop_map(|(file, read_only)| HelperOp::LoopAttach { file, read_only }),
        (".{0,40}", proptest::option::of(".{0,40}"))
            .prop_map(|(device, file)| HelperOp::LoopDetach { device, file }),
        (".{0,40}", ".{0,20}", ".{0,20}").prop_map(|(name, origin_loop, cow_loop)| {
            HelperOp::DmSnapshotCreate {
                name,
                origin_loop,
                cow_loop,
            }
        }),
        ".{0,40}".prop_map(|name| HelperOp::DmRemove { name }),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = read_frame::<HelperRequest>(&mut bytes.as_slice());
    }

    #[test]
    fn headers_announcing_too_much_are_refused(len in (MAX_FRAME as u32 + 1)..=u32::MAX, tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut frame = len.to_be_bytes().to_vec();
        frame.extend(tail);
        let result = read_frame::<HelperRequest>(&mut frame.as_slice());
        prop_assert!(matches!(result, Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn valid_frames_round_trip(op_id in "[a-z0-9]{0,32}", op in op()) {
        let request = HelperRequest { op_id, op };
        let mut buf = Vec::new();
        write_frame(&mut buf, &request).unwrap();
        let back: HelperRequest = read_frame(&mut buf.as_slice()).unwrap();
        prop_assert_eq!(back, request);
    }

    #[test]
    fn mutated_frames_never_panic(op in op(), at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
        let mut buf = Vec::new();
        write_frame(&mut buf, &HelperRequest { op_id: "x".into(), op }).unwrap();
        let i = at.index(buf.len());
        buf[i] = byte;
        buf.truncate(cut.index(buf.len() + 1).max(1));
        let _ = read_frame::<HelperRequest>(&mut buf.as_slice());
    }
}
