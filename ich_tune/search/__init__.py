"""A search with Ray Tune: the driver's steps (driver) and its inputs (options); its run folder and lock
(run_folder) in a storage (storage); Ray itself (cluster) and the data on every node (nodes); the trial
function (trial), schedulers and search algorithms; Ctrl-C (signals); what the trials came to (results)."""
