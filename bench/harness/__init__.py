"""The benchmark harness behind `omnilog bench` (docs/performance.md).

Every scenario runs against the embedded stack in the same run as the references it is compared
with (the Kafka, COPY and gzip ceilings, the faust-streaming peer), so ratios never mix machines
or moments.
"""
