"""The ground floor every layer may import: values at dotted paths in JSON, bounded summaries,
secrets redacted, templates rendered, the harness's clock, where Chromium is."""
