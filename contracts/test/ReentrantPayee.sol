// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

interface IEscrow {
    function confirm(bytes32 id) external;
    function withdraw() external;
    function settle(bytes32 id) external;
}

/// @notice Test double: a participant whose receive hook tries to withdraw (and settle) again.
contract ReentrantPayee {
    IEscrow public immutable escrow;
    bytes32 public job;
    uint256 public attempts;
    uint256 public reentered;

    constructor(IEscrow e) {
        escrow = e;
    }

    function confirm(bytes32 id) external {
        job = id;
        escrow.confirm(id);
    }

    function pull() external {
        escrow.withdraw();
    }

    receive() external payable {
        attempts += 1;
        try escrow.withdraw() {
            reentered += 1;
        } catch {}
        try escrow.settle(job) {
            reentered += 1;
        } catch {}
    }
}
