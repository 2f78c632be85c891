-- Last-touch attribution: each paid order belongs to the latest message that touched the
-- same contact at most var('attribution_window_hours') before it. Holdout rows take part
-- like messages, so the holdout's conversions measure the baseline for uplift.

with

touches as (

    select * from {{ ref('int_message_touches') }}

),

orders as (

    select * from {{ ref('stg_ops__orders') }}
    where is_paid

),

candidates as (

    select
        orders.order_id,
        orders.amount,
        touches.message_id,
        row_number() over (
            partition by orders.order_id
            order by touches.touched_at desc, touches.message_id desc
        ) as touch_rank
    from orders
    inner join touches
        on orders.contact_id = touches.contact_id
        and orders.ordered_at >= touches.touched_at
        and orders.ordered_at < {{ dbt.dateadd('hour', var('attribution_window_hours'), 'touches.touched_at') }}

),

final as (

    select
        message_id,
        count(*) as conversions,
        sum(amount) as revenue
    from candidates
    where touch_rank = 1
    group by 1

)

select * from final
