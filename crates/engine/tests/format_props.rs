//! Property tests: every stored format decodes to what was encoded, and
//! damage to any byte of an enveloped object is caught.

use proptest::prelude::*;
use vpsbackup_engine::format::*;

fn chunk_id() -> impl Strategy<Value = ChunkId> {
    prop::array::uniform32(any::<u8>()).prop_map(ChunkId)
}

proptest! {
    #[test]
    fn pack_round_trips(chunks in prop::collection::vec((chunk_id(), prop::collection::vec(any::<u8>(), 0..300), any::<bool>()), 0..20)) {
        let mut b = PackBuilder::new(0);
        for (id, payload, z) in &chunks {
            b.add(*id, payload, payload.len() as u32 + 7, if *z { FLAG_ZSTD } else { 0 });
        }
        let (bytes, entries) = b.finish();
        let decoded = decode_pack("p", &bytes).unwrap();
        prop_assert_eq!(&decoded, &entries);
        for ((id, payload, _), e) in chunks.iter().zip(&decoded) {
            prop_assert_eq!(e.id, *id);
            prop_assert_eq!(&bytes[e.offset as usize..(e.offset + e.stored_len) as usize], &payload[..]);
        }
    }

    #[test]
    fn pack_trailer_damage_is_caught(n in 1usize..10, flip in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut b = PackBuilder::new(0);
        for i in 0..n {
            b.add(ChunkId([i as u8; 32]), &[i as u8; 10], 10, 0);
        }
        let (mut bytes, _) = b.finish();
        // Damage somewhere in the trailer or footer.
        let trailer_start = bytes.len() - PACK_FOOTER_LEN - n * PACK_ENTRY_LEN;
        let at = trailer_start + flip.index(bytes.len() - trailer_start);
        bytes[at] ^= 1 << bit;
        prop_assert!(decode_pack("p", &bytes).is_err());
    }

    #[test]
    fn manifest_round_trips(
        name in "[a-z0-9-]{0,40}",
        disks in prop::collection::vec((any::<u64>(), prop::collection::vec(chunk_id(), 0..40)), 0..4),
        created in any::<u64>(),
    ) {
        let m = Manifest {
            header: ManifestHeader {
                backup_id: "b1".into(),
                server_id: name.clone(),
                server_name: format!("{name} ünïcode"),
                created_at_ms: created,
                chunk_size: 65536,
                list_fanout: 2048,
                disks: disks.iter().enumerate().map(|(i, (size, _))| ManifestDisk {
                    source_path: format!("/var/lib/vm/{i}.qcow2"),
                    format: "qcow2".into(),
                    size: *size,
                    data_bytes: size / 2,
                }).collect(),
                labels: [("description".to_owned(), name.clone())].into_iter().collect(),
            },
            lists: disks.iter().map(|(_, l)| l.clone()).collect(),
        };
        let bytes = m.encode();
        prop_assert_eq!(Manifest::decode("m", &bytes).unwrap(), m);
    }

    #[test]
    fn enveloped_objects_catch_any_flipped_bit(ids in prop::collection::vec(chunk_id(), 1..10), flip in any::<prop::sample::Index>(), bit in 0u8..8) {
        let file = IndexFile {
            packs: vec![(PackId([3; 16]), ids.iter().enumerate().map(|(i, id)| PackEntry {
                id: *id, offset: 16 + i as u32 * 10, stored_len: 10, raw_len: 20, flags: FLAG_ZSTD,
            }).collect())],
        };
        let mut bytes = file.encode();
        prop_assert_eq!(IndexFile::decode("i", &bytes).unwrap(), file);
        let at = flip.index(bytes.len());
        bytes[at] ^= 1 << bit;
        prop_assert!(IndexFile::decode("i", &bytes).is_err());
    }

    #[test]
    fn chunk_lists_round_trip(ids in prop::collection::vec(chunk_id(), 0..100)) {
        prop_assert_eq!(decode_chunk_list(&encode_chunk_list(&ids)).unwrap(), ids);
    }
}

#[test]
fn pack_ids_round_trip_through_keys() {
    let p = PackId::random();
    assert_eq!(PackId::from_key(&p.key()), Some(p));
    assert_eq!(PackId::from_key("packs/zz/notapack"), None);
    assert_eq!(PackId::from_key("index/abc"), None);
}
