"""Analysis of curated and captioned data: noun statistics (concept density) and reports."""
