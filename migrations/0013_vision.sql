-- Descriptions of images made for models without vision (appliance/core/vision.py), shared by every worker
-- (each keeps an LRU in front) and kept across restarts: an image is described once per describer.

CREATE TABLE image_descriptions (
    image TEXT NOT NULL,                -- sha256 hex of the image: a data: URL's bytes, else the URL as sent
    describer TEXT NOT NULL,            -- sha256 hex (16) of the describer model and its prompt
    description TEXT NOT NULL,
    created_at REAL NOT NULL,           -- unix seconds
    PRIMARY KEY (image, describer)
);
