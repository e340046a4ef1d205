"""Browser tests: the live page (dynamo/web/) driven by Playwright in Chromium."""
