cd /work/wt-mb
env PYTHONPATH=/work/wt-mb OMP_NUM_THREADS=1 python scripts/netns_testbed.py --workers 2 --nproc_per_node 2 \
    --compare --rates 100mbit --measure --target 0.9 --timeout 1500 --no_echo --link_samples 1 \
    --output_json /tmp/mb/multi_node_100mbit.json \
    --method "ddp=--output_dir /tmp/mb/run/ddp" \
    --method "flat=--dppf --dppf_tau 8 --dppf_replica_size 1 --output_dir /tmp/mb/run/flat" \
    --method "hier=--dppf --dppf_tau 8 --dppf_replica_size 2 --output_dir /tmp/mb/run/hier" \
    -- recipes/text_classification.py --disable_tqdm True
