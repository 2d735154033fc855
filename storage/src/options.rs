//! How RocksDB is tuned: the database options and each column family's.
//!
//! Memory is bounded as a whole, not per column family: one write-buffer
//! budget for every memtable, one block cache for every table, and a cap on
//! the write-ahead log, so adding a column family adds no memory. Every
//! column family is LZ4-compressed (the one codec compiled in). Column
//! families read by key get a bloom filter, so a miss (a new client id, a
//! first-time dedup key) costs no disk read; those read only by range or
//! prefix scans would not use one.

use rocksdb::{BlockBasedOptions, Cache, DBCompressionType, Options};

use crate::schema::POINT_LOOKUP_CFS;

/// Memory all memtables share; a column family past its share is flushed.
/// RocksDB's own default is 64 MiB per memtable per column family, with 17
/// column families over 2 GiB.
pub(crate) const WRITE_BUFFER_BUDGET: usize = 128 << 20;

/// Write-ahead log kept before the column families holding it are flushed,
/// so a rarely written column family cannot pin old logs forever. It is
/// also what a restart after a crash replays: at 256 MiB the restart
/// benchmark replayed ~160 MB in 2.9 s (benches/README.md, "Restart").
pub(crate) const MAX_TOTAL_WAL: u64 = 64 << 20;

/// The block cache every column family's tables share.
const BLOCK_CACHE: usize = 64 << 20;

/// About 1% false positives.
const BLOOM_BITS_PER_KEY: f64 = 10.0;

/// The options of the database as a whole.
pub(crate) fn database() -> Options {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    options.set_keep_log_file_num(4);
    // RocksDB shares this budget through a WriteBufferManager of its own.
    options.set_db_write_buffer_size(WRITE_BUFFER_BUDGET);
    options.set_max_total_wal_size(MAX_TOTAL_WAL);
    options
}

/// The cache the column families' tables share; one per open database.
pub(crate) fn block_cache() -> Cache {
    Cache::new_lru_cache(BLOCK_CACHE)
}

/// The options of column family `name`.
pub(crate) fn column_family(name: &str, cache: &Cache) -> Options {
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    if POINT_LOOKUP_CFS.contains(&name) {
        table.set_bloom_filter(BLOOM_BITS_PER_KEY, false);
    }
    let mut options = Options::default();
    options.set_compression_type(DBCompressionType::Lz4);
    options.set_block_based_table_factory(&table);
    options
}
