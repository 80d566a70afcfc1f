-- Per worker journal (appliance/storage/journal.py): the highest sequence number of its entries already in
-- the ledger, written in the same transaction as they are, so a journal replayed after a crash counts
-- each entry once. A row goes when its journal does.
CREATE TABLE journal_progress (
    owner TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
);
