// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

/// @title DeltaML escrow: deposit, verified metrics, payment by contribution.
/// @notice One contract holds every job; each job's money is accounted apart.
/// A job moves Open -> Staffed -> Training -> Settled, or to Cancelled.
/// The buyer deposits exactly `fixedReward * owners + variablePool`; the
/// aggregator names the trainers and validators; every participant confirms
/// itself; the aggregator records each evaluation's metric (the ledger has
/// checked the Paillier decryption proof off chain; the ciphertext's hash and
/// the randomness are kept so anyone can check it again). Settlement applies
/// DESIGN section 2: the fixed reward to every participant, the variable pool
/// times the improvement split pro rata to positive leave-one-out
/// contributions, and everything else back to the buyer. Payments are pulled
/// with `withdraw`; integer remainders go to the buyer, so nothing is lost.
contract DeltaEscrow {
    enum State { None, Open, Staffed, Training, Settled, Cancelled }

    uint8 internal constant TRAINER = 1;
    uint8 internal constant VALIDATOR = 2;
    uint256 internal constant MICRO = 1_000_000;
    uint256 internal constant MAX_SSE = 2 ** 192;  // after scaling to 64 fractional bits
    uint256 internal constant KEPT_BITS = 64;

    struct Job {
        address buyer;
        address aggregator;
        State state;
        uint32 owners;
        uint32 rounds;
        uint32 confirmations;
        uint32 lastRound;     // latest round with a recorded full-model metric
        uint32 finalCount;    // metrics recorded at the last round
        uint32 droppedCount;  // trainers the aggregator dropped for not answering
        uint64 deadline;
        bool hasBaseline;
        bool abandoned;       // the aggregator gave the job up: it may be settled at once
        uint256 deposit;
        uint256 fixedReward;
        uint256 variablePool;
        uint256 mse0;         // micro-units, full model at round 0
        uint256 mseLast;      // micro-units, full model at lastRound
        bytes32 keyHash;      // keccak256 of the buyer's Paillier modulus (big-endian bytes)
        address[] trainers;
        address[] validators;
    }

    struct Metric {
        bytes32 ciphertextHash;
        bytes32 randomnessHash;
        uint256 mseMicro;
        bool recorded;
    }

    struct MetricInput {
        uint32 round;
        uint16 model;         // 0: every trainer; i + 1: without trainers[i]
        bytes32 ciphertextHash;
        bytes sse;            // the decrypted plaintext, big-endian (it can be wider than 256 bits)
        uint32 scaleBits;     // sse is a fixed-point number with this many fractional bits
        uint32 rows;
        bytes randomness;     // Paillier randomness of the decryption (the proof)
    }

    mapping(bytes32 => Job) private jobs;
    mapping(bytes32 => mapping(address => uint8)) public roleOf;
    mapping(bytes32 => mapping(address => bool)) public confirmed;
    mapping(bytes32 => mapping(address => bool)) public dropped;
    mapping(bytes32 => mapping(uint32 => mapping(uint16 => Metric))) private metrics;
    mapping(address => uint256) public credit;
    uint256 private entered;

    event JobCreated(bytes32 indexed job, address indexed buyer, address indexed aggregator, uint256 deposit,
                     uint256 fixedReward, uint256 variablePool, uint32 owners, uint32 rounds, uint64 deadline,
                     bytes32 keyHash);
    event ParticipantsSet(bytes32 indexed job, address[] trainers, address[] validators);
    event Confirmed(bytes32 indexed job, address indexed participant);
    event TrainingStarted(bytes32 indexed job);
    event MetricRecorded(bytes32 indexed job, uint32 round, uint16 model, uint256 mseMicro, bytes32 ciphertextHash,
                         bytes sse, uint32 scaleBits, uint32 rows, bytes randomness);
    event Credited(bytes32 indexed job, address indexed payee, uint256 amount, int256 contribution);
    event Settled(bytes32 indexed job, uint256 paid, uint256 refund, uint256 variablePaid, bool complete);
    event Cancelled(bytes32 indexed job, uint256 refund);
    event Dropped(bytes32 indexed job, address indexed trainer, uint32 round);
    event Abandoned(bytes32 indexed job, uint32 round);
    event Withdrawn(address indexed payee, uint256 amount);

    error NotBuyer();
    error NotAggregator();
    error NotParticipant();
    error WrongState(State state);
    error Invalid(string reason);
    error TooEarly();
    error NothingToWithdraw();
    error Reentrant();
    error TransferFailed();

    modifier nonReentrant() {
        if (entered != 0) revert Reentrant();
        entered = 1;
        _;
        entered = 0;
    }

    modifier inState(bytes32 id, State s) {
        State actual = jobs[id].state;
        if (actual != s) revert WrongState(actual);
        _;
    }

    // ---- buyer -------------------------------------------------------------------------------

    /// @notice Open a job with its escrow: `msg.value` must be `fixedReward * owners + variablePool`.
    function createJob(bytes32 id, address aggregator, uint32 owners, uint32 rounds, uint256 fixedReward,
                       uint256 variablePool, uint64 deadline, bytes32 keyHash) external payable {
        if (jobs[id].state != State.None) revert WrongState(jobs[id].state);
        if (aggregator == address(0) || aggregator == msg.sender) revert Invalid("aggregator");
        if (owners < 2 || rounds == 0) revert Invalid("owners or rounds");
        if (deadline <= block.timestamp) revert Invalid("deadline");
        if (msg.value != fixedReward * owners + variablePool) revert Invalid("deposit");
        Job storage j = jobs[id];
        j.buyer = msg.sender;
        j.aggregator = aggregator;
        j.state = State.Open;
        j.owners = owners;
        j.rounds = rounds;
        j.deadline = deadline;
        j.deposit = msg.value;
        j.fixedReward = fixedReward;
        j.variablePool = variablePool;
        j.keyHash = keyHash;
        emit JobCreated(id, msg.sender, aggregator, msg.value, fixedReward, variablePool, owners, rounds, deadline,
                        keyHash);
    }

    /// @notice Before training starts the buyer may take the whole deposit back.
    function cancel(bytes32 id) external {
        Job storage j = jobs[id];
        if (msg.sender != j.buyer) revert NotBuyer();
        if (j.state != State.Open && j.state != State.Staffed) revert WrongState(j.state);
        j.state = State.Cancelled;
        credit[j.buyer] += j.deposit;
        emit Cancelled(id, j.deposit);
    }

    // ---- aggregator --------------------------------------------------------------------------

    function setParticipants(bytes32 id, address[] calldata trainers, address[] calldata validators)
        external inState(id, State.Open)
    {
        Job storage j = jobs[id];
        if (msg.sender != j.aggregator) revert NotAggregator();
        if (trainers.length == 0 || validators.length == 0 || trainers.length + validators.length != j.owners) {
            revert Invalid("participant counts");
        }
        _enrol(id, j, trainers, TRAINER);
        _enrol(id, j, validators, VALIDATOR);
        j.trainers = trainers;
        j.validators = validators;
        j.state = State.Staffed;
        emit ParticipantsSet(id, trainers, validators);
    }

    function _enrol(bytes32 id, Job storage j, address[] calldata who, uint8 role) private {
        for (uint256 i = 0; i < who.length; i++) {
            address a = who[i];
            if (a == address(0) || a == j.buyer || a == j.aggregator || roleOf[id][a] != 0) {
                revert Invalid("participant");
            }
            roleOf[id][a] = role;
        }
    }

    /// @notice Drop a trainer that stopped answering: it earns nothing and owes no final metric.
    /// At least one trainer stays, and only before the final metrics begin.
    function drop(bytes32 id, address trainer, uint32 round) external inState(id, State.Training) {
        Job storage j = jobs[id];
        if (msg.sender != j.aggregator) revert NotAggregator();
        if (roleOf[id][trainer] != TRAINER || dropped[id][trainer]) revert Invalid("not an active trainer");
        if (j.droppedCount + 1 >= j.trainers.length) revert Invalid("the last trainer");
        if (j.finalCount != 0) revert Invalid("final metrics begun");
        dropped[id][trainer] = true;
        j.droppedCount += 1;
        emit Dropped(id, trainer, round);
    }

    /// @notice Give a failed job up: anyone may then settle it at once, as after its deadline
    /// (fixed rewards if training had verified progress, the rest back to the buyer).
    function abandon(bytes32 id, uint32 round) external {
        Job storage j = jobs[id];
        if (j.state != State.Open && j.state != State.Staffed && j.state != State.Training) revert WrongState(j.state);
        if (msg.sender != j.aggregator) revert NotAggregator();
        if (j.abandoned) revert Invalid("already abandoned");
        j.abandoned = true;
        emit Abandoned(id, round);
    }

    /// @notice Record one published metric; the ledger checked its decryption proof before relaying.
    function recordMetric(bytes32 id, MetricInput calldata x) external inState(id, State.Training) {
        Job storage j = jobs[id];
        if (msg.sender != j.aggregator) revert NotAggregator();
        _recordMetric(id, j, x);
    }

    /// @notice Record several published metrics at once (the last evaluation's, one per model), all
    /// or none; the ledger checked every decryption proof before relaying.
    function recordMetrics(bytes32 id, MetricInput[] calldata xs) external inState(id, State.Training) {
        Job storage j = jobs[id];
        if (msg.sender != j.aggregator) revert NotAggregator();
        if (xs.length == 0) revert Invalid("no metrics");
        for (uint256 i = 0; i < xs.length; i++) _recordMetric(id, j, xs[i]);
    }

    function _recordMetric(bytes32 id, Job storage j, MetricInput calldata x) private {
        if (x.round > j.rounds || x.model > j.trainers.length || x.rows == 0) revert Invalid("metric index");
        if (x.model != 0 && x.round != j.rounds) revert Invalid("leave-one-out metrics are final");
        if (x.model != 0 && dropped[id][j.trainers[x.model - 1]]) revert Invalid("dropped trainer");
        if (x.randomness.length == 0 || x.sse.length > 512) revert Invalid("metric value");
        Metric storage slot = metrics[id][x.round][x.model];
        if (slot.recorded) revert Invalid("metric already recorded");
        uint256 mse = mseMicro(x.sse, x.scaleBits, x.rows);
        slot.ciphertextHash = x.ciphertextHash;
        slot.randomnessHash = keccak256(x.randomness);
        slot.mseMicro = mse;
        slot.recorded = true;
        if (x.model == 0) {
            if (x.round == 0) {
                j.mse0 = mse;
                j.hasBaseline = true;
            } else if (x.round >= j.lastRound) {
                j.lastRound = x.round;
                j.mseLast = mse;
            }
        }
        if (x.round == j.rounds) j.finalCount += 1;
        emit MetricRecorded(id, x.round, x.model, mse, x.ciphertextHash, x.sse, x.scaleBits, x.rows, x.randomness);
    }

    /// @notice floor(floor(sse / 2^(scaleBits-64)) * 10^6 / rows / 2^64): the MSE in micro-units.
    function mseMicro(bytes calldata sse, uint32 scaleBits, uint32 rows) public pure returns (uint256) {
        uint256 t;
        if (scaleBits >= KEPT_BITS) {
            t = _shiftDown(sse, scaleBits - KEPT_BITS);
        } else {
            t = _shiftDown(sse, 0);
            if (t >= MAX_SSE) revert Invalid("metric value");
            t <<= (KEPT_BITS - scaleBits);
        }
        if (t >= MAX_SSE) revert Invalid("metric value");
        return ((t * MICRO) / rows) >> KEPT_BITS;
    }

    /// @dev A big-endian number of any length shifted right by `bits`; the result must fit 256 bits.
    function _shiftDown(bytes calldata x, uint256 bits) private pure returns (uint256 v) {
        uint256 drop = bits / 8;
        if (x.length <= drop) return 0;
        uint256 keep = x.length - drop;
        uint256 start = 0;
        while (keep > 32 && x[start] == 0) {
            start++;
            keep--;
        }
        if (keep > 32) revert Invalid("metric value");
        for (uint256 i = start; i < start + keep; i++) {
            v = (v << 8) | uint8(x[i]);
        }
        v >>= bits % 8;
    }

    // ---- participants ------------------------------------------------------------------------

    function confirm(bytes32 id) external inState(id, State.Staffed) {
        if (roleOf[id][msg.sender] == 0) revert NotParticipant();
        if (confirmed[id][msg.sender]) revert Invalid("already confirmed");
        Job storage j = jobs[id];
        confirmed[id][msg.sender] = true;
        j.confirmations += 1;
        emit Confirmed(id, msg.sender);
        if (j.confirmations == j.owners) {
            j.state = State.Training;
            emit TrainingStarted(id);
        }
    }

    // ---- settlement --------------------------------------------------------------------------

    /// @notice Anyone may settle a job whose final metrics are all recorded; after the deadline
    /// anyone may settle a stalled job on its last verified metrics, or refund it if there are none.
    function settle(bytes32 id) external {
        Job storage j = jobs[id];
        State s = j.state;
        if (s != State.Open && s != State.Staffed && s != State.Training) revert WrongState(s);
        bool complete = s == State.Training && !j.abandoned
            && j.finalCount == j.trainers.length + 1 - j.droppedCount;
        if (!complete && !j.abandoned && block.timestamp <= j.deadline) revert TooEarly();
        j.state = State.Settled;
        if (s != State.Training || !j.hasBaseline || j.lastRound == 0) {
            credit[j.buyer] += j.deposit;
            emit Settled(id, 0, j.deposit, 0, false);
            return;
        }
        uint256 variable = _variable(j);
        uint256 paid = 0;
        uint256 variablePaid = 0;
        uint256 total = 0;
        uint256 n = j.trainers.length;
        int256[] memory contribution = new int256[](n);
        if (complete) {
            uint256 full = metrics[id][j.rounds][0].mseMicro;
            for (uint256 i = 0; i < n; i++) {
                if (dropped[id][j.trainers[i]]) continue;
                contribution[i] = int256(metrics[id][j.rounds][uint16(i + 1)].mseMicro) - int256(full);
                if (contribution[i] > 0) total += uint256(contribution[i]);
            }
        }
        for (uint256 i = 0; i < n; i++) {
            if (dropped[id][j.trainers[i]]) continue;  // it did not complete its work
            uint256 share = total == 0 || contribution[i] <= 0 ? 0 : variable * uint256(contribution[i]) / total;
            variablePaid += share;
            paid += _credit(id, j.trainers[i], j.fixedReward + share, contribution[i]);
        }
        for (uint256 i = 0; i < j.validators.length; i++) {
            paid += _credit(id, j.validators[i], j.fixedReward, 0);
        }
        uint256 refund = j.deposit - paid;
        credit[j.buyer] += refund;
        emit Settled(id, paid, refund, variablePaid, complete);
    }

    function _variable(Job storage j) private view returns (uint256) {
        uint256 finalMse = j.mseLast;
        if (j.mse0 == 0 || finalMse >= j.mse0) return 0;
        return j.variablePool * (j.mse0 - finalMse) / j.mse0;
    }

    function _credit(bytes32 id, address payee, uint256 amount, int256 contribution) private returns (uint256) {
        credit[payee] += amount;
        emit Credited(id, payee, amount, contribution);
        return amount;
    }

    /// @notice Pull everything credited to the caller, across jobs.
    function withdraw() external nonReentrant {
        uint256 amount = credit[msg.sender];
        if (amount == 0) revert NothingToWithdraw();
        credit[msg.sender] = 0;
        (bool ok, ) = msg.sender.call{value: amount}("");
        if (!ok) revert TransferFailed();
        emit Withdrawn(msg.sender, amount);
    }

    // ---- views -------------------------------------------------------------------------------

    function jobState(bytes32 id) external view returns (State) {
        return jobs[id].state;
    }

    function jobInfo(bytes32 id) external view returns (address buyer, address aggregator, State state,
                                                        uint256 deposit, uint64 deadline, bytes32 keyHash) {
        Job storage j = jobs[id];
        return (j.buyer, j.aggregator, j.state, j.deposit, j.deadline, j.keyHash);
    }

    /// @notice What an aggregator that lost a job needs to give its escrow up: whether it still can
    /// be (and by whom), whether it was, and how many participants a settlement pays.
    function standing(bytes32 id) external view returns (State state, address aggregator, bool abandoned,
                                                         uint256 enrolled) {
        Job storage j = jobs[id];
        return (j.state, j.aggregator, j.abandoned, j.trainers.length + j.validators.length);
    }

    function participants(bytes32 id) external view returns (address[] memory, address[] memory) {
        return (jobs[id].trainers, jobs[id].validators);
    }

    function metricOf(bytes32 id, uint32 round, uint16 model) external view returns (Metric memory) {
        return metrics[id][round][model];
    }
}
