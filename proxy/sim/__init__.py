"""The Polygon simulator: synthetic market data (a sans-I/O model) served with Polygon's
protocol and its faults, for the demo, the tests and the benchmark."""
