//! The streaming step's plan and tile order (host/src/engine/stream_plan.rs), checked without a
//! GPU: every weight streamed exactly once, pages the loader can copy whole, and hand-off
//! sums whose bits do not depend on the order they are added in.

use half::bf16;
use host::engine::abi::*;
use host::engine::stream_plan::{
    block_plans, decode_sum, down_tiles, encode_part, layer_bytes, mlp_pages, o_tiles, parse_copies_in_flight,
    parse_poll_gap, MlpSplit,
};

const VOCAB: usize = 151936;

#[test]
fn every_mlp_unit_and_lm_row_has_one_block() {
    for split in [MlpSplit::EvenBytes, MlpSplit::RingFirst, MlpSplit::HeadUnits(0), MlpSplit::HeadUnits(2)] {
        let plans = block_plans(VOCAB, split);
        assert_eq!(plans.len(), STREAM_GRID as usize);
        let (mut unit, mut row) = (0, 0);
        for (b, p) in plans.iter().enumerate() {
            assert_eq!(p.mlp_start, unit, "{split:?}: block {b}'s MLP units do not follow the previous block's");
            assert_eq!(p.lm_start, row, "{split:?}: block {b}'s LM-head rows do not follow the previous block's");
            assert!(p.mlp_units <= STREAM_MAX_UNITS, "{split:?}: block {b}: {} MLP units", p.mlp_units);
            if split != MlpSplit::HeadUnits(0) {
                assert!(p.mlp_units >= 1, "{split:?}: block {b} has no MLP units");
            }
            assert!(
                p.lm_rows > 0 && p.lm_rows.is_multiple_of(STREAM_LM_ROWS_PER_PAGE),
                "block {b}: {} LM rows",
                p.lm_rows
            );
            unit += p.mlp_units;
            row += p.lm_rows;
        }
        assert_eq!(unit, STREAM_MLP_UNITS, "{split:?}: the MLP units do not add up");
        assert_eq!(row as usize, VOCAB, "{split:?}: the LM-head rows do not add up");
        let pages: Vec<u32> = plans.iter().map(|p| p.lm_rows / STREAM_LM_ROWS_PER_PAGE).collect();
        assert!(pages.iter().max().unwrap() - pages.iter().min().unwrap() <= 1, "LM-head pages {pages:?}");
    }
}

/// Split by bytes, the slowest block streams within one MLP unit of the average per layer
/// (31.5 MB over 120 blocks is 256 KiB each); split ring first, every block without attention
/// holds its whole MLP share in its ring, and takes as many units as fit.
#[test]
fn the_splits_do_what_they_say() {
    let layer = 2 * (4096 * 1024 + 1024 * 2048 + 3 * 3072 * 1024) as u64;
    let bytes = |plans: &[StreamBlockPlan]| -> Vec<u64> {
        plans.iter().enumerate().map(|(b, p)| layer_bytes((b as u32) < STREAM_HEAD_BLOCKS, p.mlp_units)).collect()
    };
    let even = bytes(&block_plans(VOCAB, MlpSplit::EvenBytes));
    assert_eq!(even.iter().sum::<u64>(), layer, "the blocks' pages are not one layer's weights");
    let unit = (STREAM_PAGE_BYTES + STREAM_DOWN_UNIT_BYTES) as u64;
    let worst = *even.iter().max().unwrap();
    assert!(
        worst <= layer / STREAM_GRID as u64 + unit,
        "split by bytes, the slowest block streams {worst} bytes a layer"
    );

    let ring = block_plans(VOCAB, MlpSplit::RingFirst);
    assert_eq!(bytes(&ring).iter().sum::<u64>(), layer);
    for p in &ring[STREAM_HEAD_BLOCKS as usize..] {
        assert!(mlp_pages(p.mlp_units) <= STREAM_RING_PAGES, "{} units do not fit the ring", p.mlp_units);
        assert!(mlp_pages(p.mlp_units + 1) > STREAM_RING_PAGES, "{} units leave room in the ring", p.mlp_units);
    }
}

#[test]
fn splits_parse_and_refuse_what_the_blocks_cannot_take() {
    assert_eq!(MlpSplit::parse("even"), Some(MlpSplit::EvenBytes));
    assert_eq!(MlpSplit::parse("ring"), Some(MlpSplit::RingFirst));
    assert_eq!(MlpSplit::parse("heads:3"), Some(MlpSplit::HeadUnits(3)));
    let plans = block_plans(VOCAB, MlpSplit::HeadUnits(3));
    assert!(plans[..STREAM_HEAD_BLOCKS as usize].iter().all(|p| p.mlp_units == 3));
    // 0 units for the head blocks leaves 768 over 56 blocks: 14 each at most, within 16.
    assert!(MlpSplit::parse("heads:0").is_some());
    for bad in ["heads:17", "heads:13", "heads:", "heads:x", "fast", ""] {
        assert_eq!(MlpSplit::parse(bad), None, "{bad:?} accepted");
    }
}

#[test]
fn the_tiles_are_the_matrices_columns() {
    let q_dim = (STREAM_HEADS * STREAM_HEAD_DIM) as usize;
    let (hidden, inter) = (STREAM_HIDDEN as usize, STREAM_INTER as usize);
    let o: Vec<bf16> = (0..hidden * q_dim).map(|i| bf16::from_bits((i * 7 % 65521) as u16)).collect();
    let t = o_tiles(&o);
    assert_eq!(t.len(), o.len());
    for (b, row, c) in [(0, 0, 0), (5, 17, 31), (63, 1023, 7), (31, 512, 16)] {
        assert_eq!(
            t[(b * hidden + row) * 32 + c],
            o[row * q_dim + 32 * b + c].to_bits(),
            "o tile {b} row {row} col {c}"
        );
    }
    let d: Vec<bf16> = (0..hidden * inter).map(|i| bf16::from_bits((i * 13 % 65521) as u16)).collect();
    let t = down_tiles(&d);
    assert_eq!(t.len(), d.len());
    // Two units' tiles make one ring page.
    assert_eq!(2 * hidden * 4 * 2, STREAM_PAGE_BYTES as usize);
    for (u, row, c) in [(0, 0, 0), (767, 1023, 3), (100, 5, 2)] {
        assert_eq!(
            t[(u * hidden + row) * 4 + c],
            d[row * inter + 4 * u + c].to_bits(),
            "down tile {u} row {row} col {c}"
        );
    }
    // A tile is a whole number of the loader's copies.
    assert_eq!(hidden * 32 * 2, (STREAM_O_PAGES * STREAM_PAGE_BYTES) as usize);
    assert_eq!(hidden * 4 * 2, STREAM_DOWN_UNIT_BYTES as usize);
}

#[test]
fn hand_off_sums_count_and_do_not_depend_on_order() {
    let parts = [0.5f32, -1.25, 3.0e-5, 1000.0, -999.9, 7.0, -0.001, 2.0e-9, 42.0, -42.0, 0.3, 0.7, -5.5, 6.25, 1.0e4];
    let add = |order: &[usize]| order.iter().fold(0u64, |w, &i| w.wrapping_add(encode_part(parts[i])));
    let forward: Vec<usize> = (0..parts.len()).collect();
    let backward: Vec<usize> = forward.iter().rev().cloned().collect();
    let shuffled = [7, 3, 14, 0, 9, 1, 12, 5, 2, 11, 8, 13, 4, 10, 6];
    let w = add(&forward);
    assert_eq!(w, add(&backward));
    assert_eq!(w, add(&shuffled));
    let n = parts.len() as u32;
    let v = decode_sum(w, n).expect("the word counts its parts");
    let exact: f64 = parts.iter().map(|&p| p as f64).sum();
    assert!((v as f64 - exact).abs() < 1e-3, "{v} vs {exact}");
    assert!(decode_sum(w, n - 1).is_none() && decode_sum(w, n + 1).is_none(), "a partial sum passed for complete");
    // Out of range and NaN are clamped, never carried into the count.
    let big = encode_part(f32::INFINITY).wrapping_add(encode_part(f32::NAN));
    assert_eq!(decode_sum(big, 2), Some(0.0));
    assert_eq!(decode_sum(encode_part(-3.0e9), 1), Some(-STREAM_CLAMP));
}

/// The kernel's split of a kv head's cached positions over its cluster (`stream_kv_pages`):
/// every position before the new one in exactly one block's pages, every page holding at
/// least one position and no more than a page's worth, the new position with a block whose
/// page count is the cluster's fewest.
#[test]
fn cached_positions_have_one_page_and_one_block() {
    let per = STREAM_KV_PAGE_POSITIONS;
    assert_eq!(2 * per * STREAM_HEAD_DIM * 2, STREAM_PAGE_BYTES, "a page is 32 k rows and 32 v rows");
    for pos in 0..3000u32 {
        let mut seen = vec![0u32; pos as usize];
        let counts: Vec<u32> = (0..STREAM_CLUSTER).map(|r| stream_kv_pages(pos, r)).collect();
        for (r, &n) in counts.iter().enumerate() {
            for i in 0..n {
                let page = r as u32 + STREAM_CLUSTER * i;
                let (lo, hi) = (per * page, (per * (page + 1)).min(pos));
                assert!(lo < hi, "position {pos}: block {r}'s page {i} holds no position");
                for j in lo..hi {
                    seen[j as usize] += 1;
                }
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "position {pos}: cached positions not covered once");
        let fewest = *counts.iter().min().unwrap();
        assert_eq!(counts[stream_new_position_rank(pos) as usize], fewest, "position {pos}: pages {counts:?}");
    }
}

#[test]
fn copies_in_flight_parse_within_the_ring() {
    assert_eq!(parse_copies_in_flight("3"), Some(3));
    assert_eq!(parse_copies_in_flight(&STREAM_RING_PAGES.to_string()), Some(STREAM_RING_PAGES));
    for bad in ["0", "13", "-1", "", "three", "3.0"] {
        assert_eq!(parse_copies_in_flight(bad), None, "{bad:?} accepted");
    }
    assert!((1..=STREAM_RING_PAGES).contains(&STREAM_COPIES_IN_FLIGHT));
}

#[test]
fn poll_gaps_parse_within_their_bound() {
    assert_eq!(parse_poll_gap("0"), Some(0));
    assert_eq!(parse_poll_gap("800"), Some(800));
    assert_eq!(parse_poll_gap(&STREAM_MAX_POLL_GAP.to_string()), Some(STREAM_MAX_POLL_GAP));
    for bad in [&(STREAM_MAX_POLL_GAP + 1).to_string()[..], "-1", "", "fast", "1e3"] {
        assert_eq!(parse_poll_gap(bad), None, "{bad:?} accepted");
    }
    assert_eq!(parse_poll_gap(&STREAM_POLL_GAP_CYCLES.to_string()), Some(STREAM_POLL_GAP_CYCLES), "the default");
}

/// The trace's summary over each kind of block: medians and the latest block of a synthetic
/// trace whose marks are known, marks only blocks with attention record left out of the
/// others' summary.
#[test]
fn the_trace_summary_finds_medians_and_the_latest_block() {
    use host::engine::stream_trace::{summarize, TraceBlocks};
    let per = STREAM_TRACE_MARKS as usize;
    let mut marks = vec![0u64; STREAM_GRID as usize * per];
    // 1 GHz: 1000 cycles a microsecond. Mark i of block b at (i + 1) us + 10 b ns after the
    // mark it is measured from; every block starts its layer at a different time.
    let clock_khz = 1e6;
    let layer = [
        StreamMark::InputNormed,
        StreamMark::QkvPages,
        StreamMark::QkvExchanged,
        StreamMark::QkvRotated,
        StreamMark::CachedPositions,
        StreamMark::AttentionMerged,
        StreamMark::OPages,
        StreamMark::OSumPublished,
        StreamMark::OSumSeen,
        StreamMark::GateUpPages,
        StreamMark::DownPages,
        StreamMark::DownSumPublished,
        StreamMark::DownSumSeen,
    ];
    for b in 0..STREAM_GRID as usize {
        let t = &mut marks[b * per..(b + 1) * per];
        let start = 5_000_000 + 777 * b as u64;
        t[StreamMark::StepStart as usize] = start;
        t[StreamMark::LayerStart as usize] = start + 100_000;
        for (i, m) in layer.iter().enumerate() {
            t[*m as usize] = start + 100_000 + 1000 * (i as u64 + 1) + 10 * b as u64;
        }
        // Only rank 0 of each cluster with attention has a cached page (at position 1, say).
        if b < STREAM_HEAD_BLOCKS as usize && b % 8 == 0 {
            t[StreamMark::CachedPageIn as usize] = start + 100_000 + 4500 + 10 * b as u64;
        }
        t[StreamMark::LmHeadStart as usize] = start + 400_000;
        t[StreamMark::LmHeadPages as usize] = start + 400_000 + 60_000 + 10 * b as u64;
        t[StreamMark::TokenKnown as usize] = start + 400_000 + 64_000 + 10 * b as u64;
    }
    let mut heads = summarize(&marks, clock_khz, TraceBlocks::Heads);
    let others = summarize(&marks, clock_khz, TraceBlocks::Others);
    let all = summarize(&marks, clock_khz, TraceBlocks::All);
    assert_eq!((heads.len(), others.len(), all.len()), (17, 8, 17), "marks per summary");
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    let (h, o) = (STREAM_HEAD_BLOCKS as f64, STREAM_GRID as f64);
    // The mark only some blocks record: over those alone (blocks 0, 8, .., 56).
    let page_in = heads.remove(4);
    assert_eq!(page_in.name, "first cached page in");
    assert!(close(page_in.median_us, 4.5 + 0.01 * 28.0), "first cached page in: median {}", page_in.median_us);
    assert_eq!(page_in.latest_block, STREAM_HEAD_BLOCKS - 8);
    for (i, m) in heads.iter().take(13).enumerate() {
        let base = i as f64 + 1.0;
        assert!(close(m.median_us, base + 0.01 * (h - 1.0) / 2.0), "{}: median {}", m.name, m.median_us);
        assert!(close(m.latest_us, base + 0.01 * (h - 1.0)), "{}: latest {}", m.name, m.latest_us);
        assert_eq!(m.latest_block, STREAM_HEAD_BLOCKS - 1, "{}", m.name);
    }
    assert_eq!(others[0].name, "o sum seen", "the others' summary starts at the first mark they record");
    for (i, m) in others.iter().take(5).enumerate() {
        let base = i as f64 + 9.0;
        assert!(close(m.median_us, base + 0.01 * (h + o - 1.0) / 2.0), "{}: median {}", m.name, m.median_us);
        assert_eq!(m.latest_block, STREAM_GRID - 1, "{}", m.name);
    }
    let step = all.iter().find(|m| m.name == "step").unwrap();
    assert!(close(step.latest_us, 400.0 + 64.0 + 0.01 * (o - 1.0)), "step: {}", step.latest_us);
    let lm = all.iter().find(|m| m.name == "LM head pages").unwrap();
    assert!(close(lm.median_us, 60.0 + 0.01 * (o - 1.0) / 2.0), "LM head pages: {}", lm.median_us);
}
